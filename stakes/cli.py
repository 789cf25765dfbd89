"""The ``stakes`` command line.

    stakes pretrain --dataset digits --out model.pt
    stakes anchors  --dataset cifar10 --encoder minilm --out anchors.pt
    stakes unlearn  --dataset digits --method structguard --k 8 --seed 0 --out result.json
    stakes compare  --dataset digits --methods neggrad,adv,l2ul,salun,structguard --k 8,16 \
                    --seeds 0,1,2,3,4 --out report/

The job-building code (data, model, anchors, config, one run) lives in :mod:`stakes.jobs`, shared
with :mod:`stakes.compare`; this module is the top floor and nothing imports it back.

Errors in the user's input print one line ``stakes: error: ...`` and exit with status 2; a run
that diverges (non-finite loss) exits with status 3 and writes nothing; a data-parallel job whose
process group fails (a rank died, a collective timed out) exits with status 4.

Under ``torchrun`` (``torchrun --standalone --nproc-per-node=N -m stakes unlearn ...``) ``unlearn``
runs data-parallel over the N processes (:mod:`stakes.distributed`) and ``compare`` spreads whole
runs over them; rank 0 alone prints and writes. A job restarted by ``torchrun --max-restarts``
resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from stakes import distributed as dist_
from stakes._io import atomic_json_dump, check_output_path
from stakes.config import PRESETS
from stakes.methods import NonFiniteError, available_methods
from stakes.jobs import (AnchorSpec, DataSpec, ModelSpec, RunSpec, UsageError, float_list, load_data, load_model,
                         load_or_build_anchors, load_plugins, make_config, parse_overrides, run_one,
                         save_deployed_model)


# ----------------------------------------------------------------------------- commands


def cmd_pretrain(args) -> int:
    from stakes.models import build_model, default_arch
    from stakes.pretrain import pretrain, save_checkpoint

    data = load_data(data_spec(args))
    arch = args.arch or default_arch(data.name)
    torch.manual_seed(args.seed)
    c, h, _ = data.input_shape
    model = build_model(arch, data.num_classes, in_channels=c, image_size=h)
    kwargs = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size))
              if v is not None}
    stats = pretrain(model, data, seed=args.seed, progress=not args.no_progress, device=args.device,
                     precision=args.precision, **kwargs)
    meta = {"dataset": data.name, "arch": arch, "seed": args.seed, **stats}
    save_checkpoint(args.out, model, meta)
    print(f"pretrained {arch} on {data.name}: train {stats['train_accuracy']:.2f} %, "
          f"test {stats['test_accuracy']:.2f} % in {stats['wall_time_s']:.1f} s -> {args.out}")
    return 0


def cmd_anchors(args) -> int:
    from stakes.anchors import BUNDLED_DESCRIPTIONS, build_anchors, class_prompts, load_descriptions, save_anchors
    from stakes.pretrain import default_cache_dir

    if args.dataset in BUNDLED_DESCRIPTIONS and args.root is None and args.dataset != "digits" and args.dataset != "shapes":
        # CIFAR class names come with the bundled descriptions: no data folder needed to build anchors
        class_names = list(load_descriptions(args.dataset).keys())
    else:
        class_names = load_data(data_spec(args)).class_names
    if args.encoder == "prototype":
        raise UsageError("prototype anchors depend on a model: use `stakes unlearn --encoder prototype`")
    descriptions = args.descriptions or (args.dataset if args.dataset in BUNDLED_DESCRIPTIONS else None)
    anchors = build_anchors(class_names, descriptions=descriptions, encoder=args.encoder,
                            cache_dir=args.cache_dir or default_cache_dir(), checkpoint=args.clip_checkpoint,
                            arch=args.clip_arch, allow_random=args.clip_random)
    prompts = class_prompts(class_names, load_descriptions(descriptions) if descriptions else None)
    save_anchors(args.out, anchors, {"class_names": class_names, "encoder": args.encoder, "prompts": prompts,
                                     "dataset": args.dataset})
    print(f"{anchors.shape[0]} anchors of dim {anchors.shape[1]} ({args.encoder}) -> {args.out}")
    return 0


def _summary_lines(rec: dict) -> list:
    pre = rec["pretrained"]
    px = rec.get("proxies") or {}
    lines = [
        f"stakes unlearn — {rec['method']} on {rec['dataset']}{' (synthetic)' if rec.get('synthetic') else ''}, "
        f"k = {rec['k']}, seed = {rec['seed']}, preset = {rec['config']['preset']}",
        f"  proxies: {px.get('n', 0)} at eps = {px.get('eps', float('nan')):.3f} "
        f"(targeted attack success {100 * px.get('success_rate', float('nan')):.1f} %)"
        + (f", early exit: {px['mean_pgd_steps']:.1f} PGD steps a proxy on average" if "mean_pgd_steps" in px else "")
        + (f", attacking the model {px['attacked_model']['method']} unlearned first "
           f"({px['attacked_model']['steps']} steps, stopped: {px['attacked_model']['stopped']})"
           if px.get("attacked_model") else ""),
        f"  {'':22s}{'pretrained':>12s}{'unlearned':>12s}",
        f"  {'forget accuracy %':22s}{pre['forget_accuracy']:12.2f}{rec['forget_accuracy']:12.2f}",
        f"  {'retain accuracy %':22s}{pre['retain_accuracy']:12.2f}{rec['retain_accuracy']:12.2f}",
        f"  {'test accuracy %':22s}{pre['test_accuracy']:12.2f}{rec['test_accuracy']:12.2f}",
    ]
    if rec.get("structure_drift") is not None:
        lines.append(f"  structure drift (held-out): {rec['structure_drift']:.4f}")
    mia = rec.get("mia") or {}
    if mia:
        lines.append(f"  membership inference (forget vs test): accuracy {mia.get('mia_accuracy', float('nan')):.1f} %, "
                     f"AUC {mia.get('mia_auc', float('nan')):.3f}")
    ret = rec.get("retrieval") or {}
    if ret:
        lines.append(f"  retrieval (test vs retained): recall@1 {ret['recall@1']:.1f} %, mAP {ret['mAP']:.1f} %; "
                     f"forgotten images retrieving their class {ret['forgotten_retrieval_rate']:.1f} %")
    anchors = rec.get("anchors") or {}
    if rec["config"].get("preset") == "authors" and anchors.get("encoder") == "minilm":
        lines.append("  anchors: MiniLM (all-MiniLM-L6-v2, bundled); the authors encode their descriptions with CLIP "
                     "ViT-B/32, whose weights are not here: --encoder open_clip --clip-checkpoint FILE uses them")
    info = rec.get("model") or {}
    if info.get("normalization"):
        norm = info["normalization"]
        stats = f" mean {norm['mean']}, std {norm['std']}" if norm.get("mean") is not None else ""
        lines.append(f"  model: {info.get('source')} → {info.get('type')} ({info.get('form')}); input normalisation: "
                     f"{norm['source']}{stats}")
    lines.append(f"  {rec['steps']} steps, {rec['epochs']} epochs, stopped: {rec['stopped']}, "
                 f"{rec['wall_time_s']:.1f} s")
    return lines


def cmd_unlearn(args) -> int:
    ctx = dist_.current()
    data = load_data(data_spec(args))
    if not 1 <= args.k <= len(data.train_y):
        raise UsageError(f"--k must be between 1 and the training set size {len(data.train_y)}, got {args.k}")
    with dist_.main_first(ctx):   # rank 0 first: it may pretrain and cache the default model and anchors
        model, _ = load_model(model_spec(args), data)
        anchors, anchor_meta = load_or_build_anchors(anchor_spec(args), data, model)
    cfg = make_config(run_spec(args), args.method, seed=args.seed)   # progress bars: rank 0 alone draws them
    # every run keeps a resumable state next to its result until the result is written; a job that
    # torchrun restarted (--max-restarts) resumes from it
    ckpt = checkpoint_path(args)
    resume = args.resume or dist_.restart_count() > 0
    record, result = run_one(data, model, anchors, args.method, args.k, args.seed, cfg=cfg,
                             checkpoint_path=ckpt, resume=resume, keep_checkpoint=True, evaluate=ctx.is_main)
    if not ctx.is_main:   # rank 0 evaluates, writes and prints; the job ends when it is done
        dist_.barrier(ctx)
        return 0
    record["anchors"] = anchor_meta
    record["distributed"]["restarts"] = dist_.restart_count()
    if args.save_model:
        save_deployed_model(args.save_model, result.model, {"method": args.method, "k": args.k, "seed": args.seed,
                                                            "dataset": data.name})
    atomic_json_dump(record, args.out)
    for path in (ckpt, ckpt + ".proxies"):
        if os.path.exists(path):
            os.remove(path)
    print("\n".join(_summary_lines(record)))
    print(f"  result -> {args.out}")
    dist_.barrier(ctx)
    return 0


def cmd_compare(args) -> int:
    from stakes.compare import CompareJob, run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    ablations = list(dict.fromkeys((args.ablate or []) + ["warm-start"] * args.ablate_warm_start
                                   + ["projector"] * args.ablate_projector))
    return run_compare(CompareJob(data=data_spec(args), model=model_spec(args), anchors=anchor_spec(args),
                                  run=run_spec(args), methods=methods, ks=args.k, seeds=args.seeds, out=args.out,
                                  ablations=ablations, retrain=args.retrain, dist_timeout=args.dist_timeout))


# ----------------------------------------------------------------------------- arguments → job dataclasses


def data_spec(args) -> DataSpec:
    return DataSpec(dataset=args.dataset, root=args.root)


def model_spec(args) -> ModelSpec:
    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together (one value per channel each)")
    normalization = "config" if args.mean is None else (float_list("--mean", args.mean), float_list("--std", args.std))
    return ModelSpec(path=args.model, arch=args.arch, model_args=parse_overrides(args.model_arg),
                     normalization=normalization, cache_dir=args.cache_dir, progress=not args.no_progress)


def anchor_spec(args) -> AnchorSpec:
    return AnchorSpec(encoder=args.encoder, descriptions=args.descriptions, path=args.anchors,
                      clip_arch=args.clip_arch, clip_checkpoint=args.clip_checkpoint, clip_random=args.clip_random,
                      cache_dir=args.cache_dir)


def run_spec(args) -> RunSpec:
    overrides = parse_overrides(args.set)
    for name in ("precision", "compile"):   # --precision / --compile: shorthands of --set
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "trajectory", None) is not None:   # --trajectory EVERY: a shorthand of --set log_every=EVERY
        overrides["log_every"] = args.trajectory
    return RunSpec(preset=args.preset, overrides=overrides, device=args.device, progress=not args.no_progress)


def cmd_report(args) -> int:
    from stakes.compare import merge_reports, rerender_report

    if args.out is None:
        if len(args.dir) > 1:
            raise UsageError(f"report: {len(args.dir)} folders given; pass --out to merge them into one report")
        print(rerender_report(args.dir[0]))
        return 0
    merge_reports(args.dir, args.out)
    print(rerender_report(args.out))
    return 0


# ----------------------------------------------------------------------------- parser


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _common_args(sp, model=True):
    from stakes.data import DATASETS

    sp.add_argument("--dataset", default="digits", choices=DATASETS, help="data set (default: digits, bundled)")
    sp.add_argument("--root", default=None, help="data folder (CIFAR python-pickle folder, ImageFolder tree)")
    sp.add_argument("--device", default="cpu", help="torch device (default: cpu; under torchrun, cuda means "
                                                       "cuda:LOCAL_RANK, one GPU per process)")
    sp.add_argument("--cache-dir", default=None, help="cache for pretrained models and anchors "
                                                      "(default: $STAKES_CACHE or ~/.cache/stakes)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                    help="autocast of the model work (default: bf16 on CUDA sm_80+, fp32 on the CPU)")
    if model:
        sp.add_argument("--model", default=None,
                        help="the model to unlearn: a stakes checkpoint (stakes pretrain), a whole pickled model "
                             "(torch.save(model); unpickled, so only your own files), or a state dict with "
                             "--arch; default: pretrain and cache one for digits/shapes")
        sp.add_argument("--arch", default=None, metavar="FAMILY:NAME",
                        help="what a --model state dict belongs to: timm:NAME, torchvision:NAME (random-weight "
                             "model built with the data set's classes), hf:LOCAL_DIR (a save_pretrained folder; "
                             "without --model its own weights) or authors:NAME (the networks of the authors' code: "
                             "authors:cifar10_resnet18|34|50, authors:cifar100_resnet18|34|50|101|152); never downloads")
        sp.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                        help="extra keyword for the --arch constructor, e.g. patch_size=4 (repeatable)")
        sp.add_argument("--mean", default=None, help="input mean per channel, comma-separated (with --std); "
                                                     "default: the model's config (timm, Hugging Face) or none")
        sp.add_argument("--std", default=None, help="input std per channel, comma-separated (with --mean)")
        sp.add_argument("--plugin", action="append", metavar="PATH_OR_MODULE",
                        help="a .py file or module that registers methods with stakes.register_method "
                             "(repeatable)")


def _anchor_args(sp):
    sp.add_argument("--encoder", default="minilm", choices=("minilm", "open_clip", "prototype"))
    sp.add_argument("--descriptions", default=None, help="JSON {class: [attribute, ...]} (default: bundled)")
    sp.add_argument("--anchors", default=None, help="anchors file from `stakes anchors`")
    sp.add_argument("--clip-arch", default="ViT-B-32")
    sp.add_argument("--clip-checkpoint", default=None, help="local open_clip checkpoint")
    sp.add_argument("--clip-random", action="store_true", help="random-weight open_clip (testing only)")


def _compile_arg(sp):
    sp.add_argument("--compile", default=None, choices=("off", "frozen", "default", "max-autotune"),
                    help="torch.compile the backbones for PGD and training (default, max-autotune), or only the frozen "
                         "original's inference copy for PGD and its structures (frozen: on a card its folded "
                         "convolutions' bias, ReLU and residual additions fuse); default off; falls back to eager "
                         "with a warning where compilation fails")


def _dist_args(sp):
    sp.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                    help="under torchrun: how long a collective waits for the other ranks before the job "
                         "stops with an error (default 1800)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stakes", description="Structure-faithful instance unlearning on fused ops.")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("pretrain", help="train and save a model")
    _common_args(sp, model=False)
    sp.add_argument("--arch", default=None)
    sp.add_argument("--epochs", type=int, default=None)
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--batch-size", type=int, default=None)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("anchors", help="build semantic anchors")
    _common_args(sp, model=False)
    _anchor_args(sp)
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_anchors)

    sp = sub.add_parser("report", help="redraw summary.md and the plots of a compare folder from its results.json, "
                                       "or merge several compare folders into one")
    sp.add_argument("dir", nargs="+", help="compare folder(s); with more than one, --out is required")
    sp.add_argument("--out", default=None, help="write the merged report of all DIRs here")
    sp.set_defaults(func=cmd_report)
    _add_run_commands(sub)
    return p


def _add_run_commands(sub) -> None:
    """``stakes unlearn`` and ``stakes compare``."""
    sp = sub.add_parser("unlearn", help="unlearn k training instances")
    _common_args(sp)
    _anchor_args(sp)
    sp.add_argument("--method", default="structguard", choices=available_methods(),
                    help="a registered method (the built-ins, and those of --plugin)")
    sp.add_argument("--k", type=int, default=8, help="forget set size")
    sp.add_argument("--preset", default="stable", choices=PRESETS)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override an option (repeatable): a shared one (lr=0.01), or the method's own "
                         "(structguard.align_weight=2, or align_weight=2)")
    sp.add_argument("--out", default="result.json")
    sp.add_argument("--checkpoint", default=None, help="resumable state file (default: OUT.ckpt; removed once "
                                                           "the result is written)")
    sp.add_argument("--resume", action="store_true", help="resume an interrupted run from its checkpoint")
    sp.add_argument("--save-model", default=None, help="also save the deployed model here")
    sp.add_argument("--trajectory", nargs="?", type=int, const=5, default=None, metavar="EVERY",
                    help="log a trajectory into the result: the evaluation sets, drift and losses every EVERY steps "
                         "(default 5); without it they are evaluated once, at the end")
    _dist_args(sp)
    _compile_arg(sp)
    sp.set_defaults(func=cmd_unlearn)

    sp = sub.add_parser("compare", help="run a grid of methods × k × seeds and write a report")
    _common_args(sp)
    _anchor_args(sp)
    sp.add_argument("--methods", default="neggrad,adv,l2ul,salun,structguard",
                    help="comma-separated registered methods (the built-ins, and those of --plugin)")
    sp.add_argument("--k", type=_int_list, default=[8, 16])
    sp.add_argument("--seeds", type=_int_list, default=[0, 1, 2, 3, 4])
    sp.add_argument("--preset", default="stable", choices=PRESETS)
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override an option (repeatable): a shared one, a method's own as NAME.option=value, or "
                         "the plain option name where one method of the grid has it")
    sp.add_argument("--ablate", action="append", metavar="NAME",
                    help="also run the ablation NAME of every method of the grid that declares it (StructGuard: "
                         "warm-start, projector); repeatable")
    sp.add_argument("--ablate-warm-start", action="store_true",
                    help="= --ablate warm-start: StructGuard with the deployed-model warm start flipped "
                         "(structguard-cold under the stable preset: the paper's random projector, trained at "
                         "projector_lr 0.009; structguard+warm under paper)")
    sp.add_argument("--ablate-projector", action="store_true",
                    help="= --ablate projector: StructGuard with the warm-started projector's training flipped "
                         "(structguard-fixedproj: projector_lr=0, or structguard-trainproj when it is already 0)")
    sp.add_argument("--retrain", action="store_true", help="also run the retrain oracle")
    sp.add_argument("--out", default="report")
    _dist_args(sp)
    _compile_arg(sp)
    sp.set_defaults(func=cmd_compare)


def _plugin_specs(argv: list) -> list:
    """The ``--plugin`` values of ``argv``, read before the parser is built: a plugin's methods must
    be registered for ``--method`` to accept them."""
    specs = []
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--plugin="):
            specs.append(arg.split("=", 1)[1])
    return specs


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        load_plugins(_plugin_specs(argv))
    except UsageError as err:
        print(f"stakes: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)

    started = False
    try:
        if args.command in ("unlearn", "compare") and parse_overrides(args.set).get("deterministic") is True:
            # before anything uses cuBLAS (model checks, prototype anchors): its workspace setting is read once
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        check_outputs(args)   # before any work: a bad --out costs a second, not a run
        started = _init_distributed(args)
        return args.func(args)
    except dist_.DistributedError as err:
        print(f"stakes: error: {err}", file=sys.stderr)
        return 4
    except RuntimeError as err:   # a collective inside autograd (DDP's all-reduce) that failed
        failure = dist_.group_failure(err)
        if failure is None:
            raise
        print(f"stakes: error: {failure}", file=sys.stderr)
        return 4
    except NonFiniteError as err:
        print(f"stakes: diverged: {_rank_prefix()}{err}", file=sys.stderr)
        return 3
    except (UsageError, ValueError, TypeError, FileNotFoundError, KeyError) as err:
        if os.environ.get("STAKES_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"stakes: error: {_rank_prefix()}{msg}", file=sys.stderr)
        return 2
    finally:
        if started:
            dist_.shutdown()


def checkpoint_path(args) -> str:
    """``stakes unlearn``'s resumable state file: ``--checkpoint``, or ``--out`` + ``.ckpt``."""
    return args.checkpoint or args.out + ".ckpt"


def check_outputs(args) -> None:
    """Check every path the command will write before it does any work (see
    :func:`stakes._io.check_output_path`): ``--out`` of every command, and ``stakes unlearn``'s
    ``--checkpoint`` (its ``.proxies`` side file beside it) and ``--save-model``, which must name
    files other than ``--out``. Nothing is written; under torchrun every rank checks."""
    if args.command in ("pretrain", "anchors"):
        check_output_path(args.out, "--out", example="model.pt" if args.command == "pretrain" else "anchors.pt")
    elif args.command in ("compare", "report"):
        if args.out is not None:
            check_output_path(args.out, "--out", folder=True)
    elif args.command == "unlearn":
        check_output_path(args.out, "--out", example="result.json")
        ckpt = checkpoint_path(args)
        arg = "--checkpoint" if args.checkpoint else "--checkpoint (default: --out + .ckpt)"
        check_output_path(ckpt, arg, example="run.ckpt")
        check_output_path(ckpt + ".proxies", "--checkpoint side file", example=None)
        named = {"--out": args.out, "--checkpoint": ckpt}
        if args.save_model:
            check_output_path(args.save_model, "--save-model", example="model.pt")
            named["--save-model"] = args.save_model
        seen: dict = {}
        for name, path in named.items():
            key = os.path.realpath(os.path.expanduser(path))
            if key in seen:
                raise UsageError(f"{seen[key]} and {name} name the same file {path}; give them different paths")
            seen[key] = name


def _rank_prefix() -> str:
    ctx = dist_.current()
    return f"rank {ctx.rank}/{ctx.world_size}: " if ctx.enabled else ""


def _init_distributed(args) -> bool:
    """Under torchrun (world size > 1): the process group for ``unlearn`` (NCCL on CUDA, gloo on CPU)
    and ``compare`` (gloo: its ranks only coordinate); ``args.device`` becomes this rank's device.
    Returns whether a group was initialised here."""
    if not dist_.wants_group():
        return False
    if args.command not in ("unlearn", "compare"):
        raise UsageError(f"`stakes {args.command}` runs on one process; launch it without torchrun "
                         "(only unlearn and compare run on several)")
    already = dist_.current().enabled
    _, args.device = dist_.init_from_env(args.device, timeout_s=args.dist_timeout,
                                         backend="gloo" if args.command == "compare" else None)
    return not already


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
