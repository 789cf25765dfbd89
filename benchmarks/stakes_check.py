"""Checks of the stakes runs ``benchmarks/gpu_check.sh`` makes on a card (step d).

``python -m benchmarks.stakes_check main CPU.json CUDA.json``
    The README's main job (structguard on digits, k = 8, seed 0) run with ``--device cpu`` and with
    ``--device cuda`` on the same machine, from the same cached pretrained model and the same anchors
    file. Checked:

    * the pretrained model's retain and test accuracy, evaluated on each device, agree within
      ``PRETRAINED_BAND`` = 1 point (same weights, same images: only rounding differs; 1 point is
      3.6 of the 360 test images), its forget accuracy within one of the k images;
    * both runs forget every image (forget accuracy 0 %);
    * the card's unlearned test accuracy is within ``--band`` points of the CPU's and at least
      ``--floor`` %;
    * the card's PGD did its work: its proxies' targeted success rate reaches the run's
      ``target_success`` (config, 0.9 by default), and its radius is within one step of the CPU's on
      the calibration grid (ε_i = base·2^(i/4), so a factor 2^(1/4)); a PGD that silently does
      nothing (a graph that records nothing, a step that writes nowhere) leaves the proxies at their
      random starts, and forgetting alone would not show it;
    * the execution policy each run recorded is the one its device resolves to: on the card CUDA
      graphs on and bf16 autocast on sm_80+ (``--arch``, e.g. 90; fp32 below sm_80), on the CPU fp32
      without graphs (a config that sets ``precision`` or ``cuda_graphs`` is expected as set).

    Why a band and not equality after unlearning: the card runs other kernels (cuDNN/TF32
    convolutions, the Triton ops, another random stream for the proxies), so the two trajectories
    drift apart from the first step the way two seeds do, and the stop rule (the first epoch end
    with forget 0 %) ends them at different steps. The band is the CPU's own seed-to-seed spread:
    the main job with these anchors for seeds 0-5 on 2 CPU cores (2026-12-07) ended at test accuracy
    46.1, 55.6, 58.9, 60.0, 69.7 and 73.1 % (seed 0: 60.0 %), a range of 26.9 points: ``BAND`` = 30
    points. ``FLOOR`` = 30 %: three times chance (10 %), well under the lowest seed (46.1 %). A card
    result outside them is a defect, not a different draw.

``python -m benchmarks.stakes_check torchrun RESULT.json [--reference OTHER.json]``
    ``torchrun --nproc-per-node=1 -m stakes unlearn --device cuda``: the result must say world size 1,
    a CUDA device, forget 0 %, and (given another run of the same job, gpu_check passes the CPU one)
    a test accuracy within the band of it. gpu_check runs it with ``STAKES_DISTRIBUTED=1``, which makes
    stakes form its process group at world size 1 and take the data-parallel path (DDP, the
    collectives), so its backend must be NCCL. A CUDA run that records gloo, or none, is wrong.

``torchrun --nproc-per-node=1 -m benchmarks.stakes_check nccl [--backend gloo --device cpu]``
    What one GPU can say about NCCL: a process group on the card, all_reduce, broadcast and
    all_gather of CUDA tensors with known results, a DistributedDataParallel step, and SyncBatchNorm's
    collective path, at world size 1. A SyncBatchNorm *module* at world size 1 never takes that path
    (torch's ``need_sync`` needs a world size > 1: it falls back to ``F.batch_norm``), so the DDP step
    says so in its name and the collective path is called directly instead (torch's
    ``SyncBatchNorm`` autograd function with the process group: the all_gather of the batch
    statistics forward, the all_reduce of the gradient sums backward), and must equal training-mode
    ``F.batch_norm`` (output, gradients, running statistics). ``--backend gloo --device cpu``: the same
    on a CPU, for the tests; SyncBatchNorm is CUDA-only (``batch_norm_stats``), so the output says it
    was not run there.

``python -m benchmarks.stakes_check compare DIR --methods A,B --seeds 0,1``
    ``stakes compare`` on the card: every (method, seed) run present with status ``ok`` (compare
    itself exits 1 when runs fail; this names them) and finite accuracies in [0, 100].

Each prints one ``VERDICT: ...`` line and exits 0 (pass) or 1 (fail); 2 for unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

BAND = 30.0             # points of unlearned test accuracy: the CPU seed-to-seed range (module docstring)
FLOOR = 30.0            # unlearned test accuracy %, three times chance
PRETRAINED_BAND = 1.0   # points: the same pretrained model evaluated on two devices


def _load(path: str) -> Dict[str, object]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"stakes_check: cannot read {path!r}: {exc}", file=sys.stderr)
        print(f"VERDICT: FAILED: cannot read {path!r} ({type(exc).__name__})")
        raise SystemExit(2) from None


def _device(result: Dict[str, object]) -> str:
    return str((result.get("config") or {}).get("device", "?"))


def _pct(value) -> str:
    return f"{value:6.2f} %" if isinstance(value, (int, float)) else f"{value!r:>6} %"


def _line(name: str, r: Dict[str, object]) -> str:
    wall = r.get("wall_time_s")
    return (f"  {name:<14} device {_device(r):<7} forget {_pct(r.get('forget_accuracy'))}  test "
            f"{_pct(r.get('test_accuracy'))}  retain {_pct(r.get('retain_accuracy'))}  steps {r.get('steps')} "
            f"({r.get('stopped')})" + (f", {wall:.1f} s" if isinstance(wall, (int, float)) else ""))


GRID_STEP = 2 ** 0.25   # the radius calibration grid's factor (stakes.proxy.radius_grid: ε_i = base·2^(i/4))
TARGET_SUCCESS = 0.9    # UnlearnConfig.target_success's default, used when a result does not record it


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_proxies(cpu: Dict[str, object], cuda: Dict[str, object]) -> List[str]:
    """The card's PGD did its work: its proxies' success rate reaches the run's target, and its
    radius lies within one calibration-grid step (a factor 2^(1/4)) of the CPU's."""
    problems = []
    p_cpu, p_cuda = cpu.get("proxies") or {}, cuda.get("proxies") or {}
    target = _number((cuda.get("config") or {}).get("target_success"))
    target = TARGET_SUCCESS if target is None else target
    rate = _number(p_cuda.get("success_rate"))
    if rate is None or not rate >= target:
        problems.append(f"cuda: proxy success rate {p_cuda.get('success_rate')!r}, below the target {target:g} "
                        "(a PGD that does nothing leaves the proxies at their random starts)")
    e_cpu, e_cuda = _number(p_cpu.get("eps")), _number(p_cuda.get("eps"))
    if e_cpu is None or e_cuda is None or not (e_cpu > 0 and e_cuda > 0):
        problems.append(f"proxy radius: cpu {p_cpu.get('eps')!r}, cuda {p_cuda.get('eps')!r} (expected two radii > 0)")
    elif not max(e_cuda / e_cpu, e_cpu / e_cuda) <= GRID_STEP * (1 + 1e-9):
        steps = abs(math.log(e_cuda / e_cpu, GRID_STEP))
        problems.append(f"proxy radius cuda {e_cuda:.4g} vs cpu {e_cpu:.4g}: {steps:.2f} grid steps apart "
                        f"(at most 1: a factor 2^(1/4))")
    if p_cpu.get("n") != p_cuda.get("n"):
        problems.append(f"proxy count: cpu {p_cpu.get('n')!r}, cuda {p_cuda.get('n')!r}")
    return problems


def check_execution(result: Dict[str, object], device: str, arch: Optional[int] = None) -> List[str]:
    """The execution policy a run recorded is the one its device resolves to (stakes.execution):
    on a card CUDA graphs on and bf16 on sm_80+ (``arch`` = 10·major + minor; fp32 below), on the
    CPU fp32 without graphs; a config that sets ``precision`` or ``cuda_graphs`` is expected as set."""
    ex, cfg = result.get("execution") or {}, result.get("config") or {}
    if not ex:
        return [f"{device}: the result records no execution policy"]
    problems = []
    if device == "cuda":
        if cfg.get("precision") is not None:
            precision, why = cfg["precision"], "as its config sets"
        elif arch is None:
            precision, why = None, ""
            problems.append("cuda: cannot tell the card's expected precision: give its arch (--arch, e.g. 90)")
        else:
            precision, why = ("bf16" if arch >= 80 else "fp32"), f"the default on sm_{arch}"
        graphs = cfg["cuda_graphs"] if cfg.get("cuda_graphs") is not None else True
    else:
        precision, why = (cfg.get("precision") or "fp32"), "the CPU's default"
        graphs = False
    if ex.get("device_type") != device:
        problems.append(f"{device}: execution ran on {ex.get('device_type')!r}, expected {device}")
    if precision is not None and ex.get("precision") != precision:
        problems.append(f"{device}: execution precision {ex.get('precision')!r}, expected {precision!r} ({why})")
    if ex.get("cuda_graphs") is not graphs:
        problems.append(f"{device}: execution cuda_graphs {ex.get('cuda_graphs')!r}, expected {graphs}"
                        + ("" if device == "cpu" else " (PGD replayed from CUDA graphs on a card)"))
    return problems


def check_main(cpu: Dict[str, object], cuda: Dict[str, object], band: float = BAND,
               floor: float = FLOOR, arch: Optional[int] = None) -> List[str]:
    """The problems of a CPU/card pair of main-job results (empty: it passes); ``arch``: the card's
    compute capability as 10·major + minor (its expected precision)."""
    problems = []
    for name, r, want in (("cpu", cpu, "cpu"), ("cuda", cuda, "cuda")):
        if not _device(r).startswith(want):
            problems.append(f"the {name} result ran on {_device(r)!r}, expected {want}")
        if r.get("forget_accuracy") != 0.0:
            problems.append(f"{name}: forget accuracy {r.get('forget_accuracy')} %, expected 0")
    p_cpu, p_cuda = cpu.get("pretrained") or {}, cuda.get("pretrained") or {}
    one_image = 100.0 / cpu["k"] + 1e-6 if isinstance(cpu.get("k"), int) and cpu["k"] > 0 else PRETRAINED_BAND
    for key, tol in (("forget_accuracy", max(one_image, PRETRAINED_BAND)), ("retain_accuracy", PRETRAINED_BAND),
                     ("test_accuracy", PRETRAINED_BAND)):
        a, b = p_cpu.get(key), p_cuda.get(key)
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol):
            problems.append(f"pretrained {key.replace('_', ' ')}: cpu {a} %, cuda {b} % "
                            f"(the same model must agree within {tol:.3g} points)")
    for key in ("method", "dataset", "k", "seed"):
        if cpu.get(key) != cuda.get(key):
            problems.append(f"the runs differ in {key}: cpu {cpu.get(key)!r}, cuda {cuda.get(key)!r}")
    a_cpu, a_cuda = (cpu.get("anchors") or {}).get("source"), (cuda.get("anchors") or {}).get("source")
    if a_cpu != a_cuda:
        problems.append(f"the runs used other anchors: cpu {a_cpu!r}, cuda {a_cuda!r}")
    t_cpu, t_cuda = float(cpu.get("test_accuracy", math.nan)), float(cuda.get("test_accuracy", math.nan))
    if not t_cuda >= floor:
        problems.append(f"cuda: test accuracy {t_cuda:.2f} % below the floor {floor:g} %")
    if not abs(t_cuda - t_cpu) <= band:
        problems.append(f"test accuracy cuda {t_cuda:.2f} % vs cpu {t_cpu:.2f} %: "
                        f"{abs(t_cuda - t_cpu):.2f} points apart, band {band:g}")
    problems += check_proxies(cpu, cuda)
    problems += check_execution(cpu, "cpu") + check_execution(cuda, "cuda", arch)
    return problems


def check_torchrun(result: Dict[str, object], reference: Optional[Dict[str, object]] = None,
                   band: float = BAND) -> List[str]:
    problems = []
    dist = result.get("distributed") or {}
    if dist.get("backend") != "nccl":
        problems.append(f"process-group backend {dist.get('backend')!r} on cuda, expected 'nccl' (gpu_check runs "
                        "it with STAKES_DISTRIBUTED=1)")
    if dist.get("world_size") != 1:
        problems.append(f"world size {dist.get('world_size')!r}, expected 1")
    if not _device(result).startswith("cuda"):
        problems.append(f"ran on {_device(result)!r}, expected cuda")
    if result.get("forget_accuracy") != 0.0:
        problems.append(f"forget accuracy {result.get('forget_accuracy')} %, expected 0")
    if reference is not None:
        t, t_ref = float(result.get("test_accuracy", math.nan)), float(reference.get("test_accuracy", math.nan))
        if not abs(t - t_ref) <= band:
            problems.append(f"test accuracy {t:.2f} % vs {t_ref:.2f} % in the reference run ({_device(reference)}): "
                            f"{abs(t - t_ref):.2f} points apart, band {band:g}")
    return problems


def check_compare(report: Dict[str, object], methods: List[str], seeds: List[int]) -> List[str]:
    problems = []
    runs = report.get("runs") or []
    got = {(r.get("method"), r.get("seed")): r for r in runs}
    for m in methods:
        for s in seeds:
            r = got.get((m, s))
            if r is None:
                problems.append(f"{m} seed {s}: no run in results.json")
            elif r.get("status") != "ok":
                problems.append(f"{m} seed {s}: status {r.get('status')!r}: {str(r.get('error'))[:200]}")
            else:
                for key in ("forget_accuracy", "test_accuracy", "retain_accuracy"):
                    v = r.get(key)
                    if not isinstance(v, (int, float)) or not 0.0 <= v <= 100.0:
                        problems.append(f"{m} seed {s}: {key} = {v!r}")
    extra = sorted(set(got) - {(m, s) for m in methods for s in seeds}, key=str)
    if extra:
        problems.append(f"unexpected runs {extra}")
    return problems


def sync_bn_collective(dev, group, world: int, apply=None) -> List[str]:
    """SyncBatchNorm's collective path, taken whatever the world size: torch's ``SyncBatchNorm``
    autograd function (``apply``, the default) called with the process group, which all-gathers the
    per-rank batch statistics forward and all-reduces the gradient sums backward. Every rank feeds the
    same batch, so the result must equal training-mode ``F.batch_norm`` of that batch: output, input /
    weight / bias gradients and the running statistics. Returns the problems (empty: it matches)."""
    import torch
    import torch.nn.functional as F

    if apply is None:
        from torch.nn.modules._functions import SyncBatchNorm as _SyncBN

        apply = _SyncBN.apply
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=gen).to(dev) * 3 + 1
    w, b = torch.rand(4, generator=gen).to(dev) + 0.5, torch.randn(4, generator=gen).to(dev)
    dy = torch.randn(6, 4, 5, 5, generator=gen).to(dev)
    eps, momentum = 1e-5, 0.1
    runs = []
    for sync in (True, False):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        rm, rv = torch.zeros(4, device=dev), torch.ones(4, device=dev)
        if sync:
            y = apply(xs, ws, bs, rm, rv, eps, momentum, group, world)
        else:
            y = F.batch_norm(xs, rm, rv, ws, bs, True, momentum, eps)
        y.backward(dy)
        runs.append({"output": y.detach(), "input grad": xs.grad, "weight grad": ws.grad, "bias grad": bs.grad,
                     "running mean": rm, "running var": rv})
    problems = []
    for key, want in runs[1].items():
        got = runs[0][key]
        if got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            diff = "missing" if got is None else (f"shape {tuple(got.shape)}" if got.shape != want.shape else
                                                  f"max |diff| {float((got - want).abs().max()):.3g}")
            problems.append(f"SyncBatchNorm's collective path: {key} differs from batch_norm ({diff})")
    return problems


def ddp_step_name(device_type: str, world: int) -> str:
    """What the smoke test's DDP step checks, named for what it does: on a card its model has a
    SyncBatchNorm module, which at world size 1 takes its local path (``need_sync`` needs > 1)."""
    if device_type != "cuda":
        return "DDP step"
    return "DDP step with a SyncBatchNorm module" + (
        " (at world size 1 it takes its local path: torch syncs only when the world size is > 1)" if world == 1 else "")


def nccl_smoke(backend: str = "nccl", device: str = "cuda") -> tuple:
    """Collectives and a DDP step at this torchrun job's world size; returns ``(what, problems)``."""
    import torch
    import torch.distributed as tdist
    import torch.nn as nn

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device, local) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group(backend, **({"device_id": dev} if dev.type == "cuda" else {}))
    problems: List[str] = []
    try:
        rank, world = tdist.get_rank(), tdist.get_world_size()
        t = torch.arange(4, device=dev, dtype=torch.float32) + rank
        tdist.all_reduce(t)
        want = torch.arange(4, dtype=torch.float32) * world + sum(range(world))
        if not torch.equal(t.cpu(), want):
            problems.append(f"all_reduce gave {t.tolist()}, expected {want.tolist()}")
        b = torch.full((3,), 7.0 if rank == 0 else -1.0, device=dev)
        tdist.broadcast(b, 0)
        if b.tolist() != [7.0] * 3:
            problems.append(f"broadcast gave {b.tolist()}")
        parts = [torch.empty(2, device=dev) for _ in range(world)]
        tdist.all_gather(parts, torch.full((2,), float(rank), device=dev))
        if [p.tolist() for p in parts] != [[float(r)] * 2 for r in range(world)]:
            problems.append(f"all_gather gave {[p.tolist() for p in parts]}")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
        if dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(dev)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local] if dev.type == "cuda" else None)
        loss = ddp(torch.rand(8, 1, 8, 8, device=dev)).square().mean()
        loss.backward()
        grads = [p.grad for p in ddp.parameters()]
        if any(g is None or not bool(torch.isfinite(g).all()) for g in grads):
            problems.append("the DDP step left a missing or non-finite gradient")
        ddp_what = ddp_step_name(dev.type, world)
        if dev.type == "cuda":
            try:
                problems += sync_bn_collective(dev, tdist.group.WORLD, world)
                bn_what = ("SyncBatchNorm's collective path called directly (all_gather of the batch statistics, "
                           "all_reduce of the gradient sums) = batch_norm")
            except Exception as exc:   # torch's function moved or changed: say so, never pass it silently
                problems.append(f"SyncBatchNorm's collective path could not run ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ''})")
                bn_what = "SyncBatchNorm's collective path FAILED"
        else:
            bn_what = f"SyncBatchNorm not run on {dev.type} (its batch_norm_stats is CUDA-only)"
        tdist.barrier()
        version = ".".join(map(str, torch.cuda.nccl.version())) if backend == "nccl" else torch.__version__
        what = f"{backend} {version} at world size {world} on {dev}: all_reduce, broadcast, all_gather, {ddp_what}; {bn_what}"
    finally:
        tdist.destroy_process_group()
    return what, problems


def _finish(what: str, problems: List[str]) -> int:
    for p in problems:
        print(f"  problem: {p}")
    if problems:
        print(f"VERDICT: FAILED {what}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        return 1
    print(f"VERDICT: ok {what}")
    return 0


def _live_arch() -> Optional[int]:
    """10·major + minor of the card torch sees (None without one)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return 10 * major + minor
    except Exception:
        pass
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stakes_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("main", help="the main job on cpu and on cuda")
    p.add_argument("cpu")
    p.add_argument("cuda")
    p.add_argument("--band", type=float, default=BAND)
    p.add_argument("--floor", type=float, default=FLOOR)
    p.add_argument("--arch", type=int, default=None,
                   help="the card's compute capability as 10*major+minor, e.g. 90 (its expected precision: bf16 "
                        "on 80 and above); default: the live card's, when torch sees one")
    p = sub.add_parser("torchrun", help="torchrun --nproc-per-node=1 on cuda (NCCL)")
    p.add_argument("result")
    p.add_argument("--reference", default=None,
                   help="another run of the same job (cpu or cuda): the test accuracy must be within the band of it")
    p.add_argument("--band", type=float, default=BAND)
    p = sub.add_parser("nccl", help="collectives and a DDP step, under torchrun")
    p.add_argument("--backend", default="nccl")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("compare", help="stakes compare on cuda")
    p.add_argument("dir")
    p.add_argument("--methods", required=True)
    p.add_argument("--seeds", required=True)
    args = parser.parse_args(argv)

    if args.command == "main":
        cpu, cuda = _load(args.cpu), _load(args.cuda)
        arch = args.arch if args.arch is not None else _live_arch()
        print(_line("cpu", cpu))
        print(_line("cuda", cuda))
        for name, r in (("cpu", cpu), ("cuda", cuda)):
            px, ex = r.get("proxies") or {}, r.get("execution") or {}
            print(f"  {name:<14} proxies n {px.get('n')}, radius {px.get('eps')}, success {px.get('success_rate')}; "
                  f"execution precision {ex.get('precision')}, cuda_graphs {ex.get('cuda_graphs')}")
        return _finish(f"main job cpu vs cuda: test cuda {_pct(cuda.get('test_accuracy')).strip()} vs cpu "
                       f"{_pct(cpu.get('test_accuracy')).strip()} (band {args.band:g} points, floor {args.floor:g} %), "
                       f"proxy success cuda {(cuda.get('proxies') or {}).get('success_rate')!r}, radius within one "
                       f"grid step, execution as expected{'' if arch is None else f' on sm_{arch}'}",
                       check_main(cpu, cuda, args.band, args.floor, arch))
    if args.command == "nccl":
        what, problems = nccl_smoke(args.backend, args.device)
        return _finish(what, problems)
    if args.command == "torchrun":
        result = _load(args.result)
        reference = _load(args.reference) if args.reference and os.path.exists(args.reference) else None
        print(_line("torchrun", result))
        if reference is not None:
            print(_line("reference", reference))
        dist = result.get("distributed") or {}
        return _finish(f"torchrun: backend {dist.get('backend')}, world size {dist.get('world_size')}, test "
                       f"{_pct(result.get('test_accuracy')).strip()}"
                       + ("" if reference else " (no reference run to compare with)"),
                       check_torchrun(result, reference, args.band))
    report = _load(os.path.join(args.dir, "results.json"))
    methods = [m for m in args.methods.split(",") if m]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for r in report.get("runs") or []:
        if r.get("status") == "ok":
            print(_line(f"{r.get('method')}/{r.get('seed')}", r))
        else:
            print(f"  {r.get('method')}/{r.get('seed')}: {r.get('status')}: {r.get('error')}")
    return _finish(f"compare: {len(methods)} methods x {len(seeds)} seeds", check_compare(report, methods, seeds))


if __name__ == "__main__":
    sys.exit(main())
