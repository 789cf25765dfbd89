"""Which of the authors' behaviours carry the numbers (issue 23, Deliver 4).

StructGuard under the ``authors`` preset (METHOD.md §9a: the authors' CIFAR-10 script as it runs),
then with each §9a behaviour switched back to stakes' own choice one at a time, then with each of
``stable``'s own choices switched on one at a time; the full ``stable`` preset as a reference.
Digits k = 16 and 32 and shapes k = 16, seeds 0-4 (stable's choices on top: digits k = 16, where the
authors' runs collapse; ``--other-direction all`` for every setting). Per run: forget accuracy and
test accuracy at the stop, the steps to forget 0 %, the held-out structure drift, and whether it
went non-finite.

The paper's radii are for CIFAR's 3×32×32 images: ε = 3.0 (StructGuard's proxies) and 4.0 (the
baselines', here the L2UL run whose model the authors' StructGuard attacks) scale with √D, so 0.433
and 0.577 on digits' 8×8 (METHOD.md §12) and 3.0 and 4.0 on shapes (3×32×32).

Variants that change the loop, the importance or the projector share one proxy set per (setting,
seed): the authors' (advertorch's attack on the model L2UL unlearned first). A variant that changes
the proxies builds its own with that one switch back (its L2UL run included). The ``pgd_weight_grads``
switch only costs time: its proxies are checked to be the authors' bit for bit instead of rerunning.
Their 101-epoch limit (ours 100) is not a variant: a run that stops before epoch 101 is the same run
under both, and the report says which runs reached it.

    python reports/authors_quirks/run.py --workers 2          # writes results.json here (resumable)
    python reports/authors_quirks/make_report.py              # README.md from results.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = [("digits", 16), ("digits", 32), ("shapes", 16)]
SEEDS = [0, 1, 2, 3, 4]

# name -> (what it is, shared overrides, StructGuard overrides, proxy set)
BACK_TO_STAKES = {
    "shuffle": ("data order shuffled each epoch", dict(shuffle=True), {}, "authors"),
    "stop_rule": ("stop checked at epoch ends from the first (stakes' rule)",
                  dict(stop_check="epoch", stop_start_epoch=0), {}, "authors"),
    "projector_mode": ("the check leaves the projector in training mode",
                       dict(projector_eval_after_check=False), {}, "authors"),
    "sr_first_steps": ("SR on every step", dict(skip_sr_first_steps=False), {}, "authors"),
    "bn_eval": ("backbone BatchNorm in eval mode", dict(bn_train_mode=False), {}, "authors"),
    "importance_step0": ("importance before the first step", {}, dict(importance_step=0), "authors"),
    "importance_shuffled": ("importance batches reshuffled", {},
                            dict(importance_order="shuffled", importance_passes="all"), "authors"),
    "importance_reference_eval": ("importance reference in eval mode", {}, dict(importance_reference="eval"),
                                  "authors"),
    "importance_live_projector": ("importance through the live projector", {}, dict(importance_projector="live"),
                                  "authors"),
    "projector_z_hidden": ("z before the projector's BatchNorm", {}, dict(projector_z="hidden"), "authors"),
    "pgd_start_ball": ("PGD start inside the ball", {}, {}, "pgd_start_ball"),
    "pgd_project_clamp": ("PGD step projects, then clamps", {}, {}, "pgd_project_clamp"),
    "targets_uniform": ("targets uniform over the other classes", {}, {}, "targets_uniform"),
    "attack_pretrained": ("proxies against the pretrained model", {}, {}, "attack_pretrained"),
}
STABLE_ON_TOP = {
    "eps_calibrated": ("radius calibrated to 90 % success", {}, {}, "eps_calibrated"),
    "grad_clip": ("gradient clipping at 2", dict(grad_clip=2.0), {}, "authors"),
    "proximal_sr": ("proximal SR step", dict(proximal=True), {}, "authors"),
    "margin_deletion": ("margin deletion", dict(deletion="margin"), {}, "authors"),
    "equal_weights": ("deletion and retention weighted equally", dict(loss_weighting="equal"), {}, "authors"),
    "warm_fixed_projector": ("warm-started fixed projector, deletion through it",
                             {}, dict(warm_start=True, projector_lr=0.0, deletion_path="deployed"), "authors"),
}
# the proxy sets: name -> shared overrides of the authors' preset
PROXY_SETS = {
    "authors": {},
    "pgd_start_ball": dict(pgd_start="ball"),
    "pgd_project_clamp": dict(pgd_order="project_clamp"),
    "targets_uniform": dict(proxy_targets="uniform"),
    "attack_pretrained": dict(proxy_model="pretrained"),
    "eps_calibrated": dict(eps=None),
    "weight_grads_off": dict(pgd_weight_grads=False),
}


def radii(dataset: str) -> tuple:
    d = {"digits": 64, "shapes": 3 * 32 * 32}[dataset]
    s = math.sqrt(d / 3072)
    return round(3.0 * s, 3), round(4.0 * s, 3)


def authors_config(dataset: str, seed: int, shared: dict, own: dict):
    import stakes

    eps, base_eps = radii(dataset)
    values = dict(seed=seed, eps=eps, proxy_model_options={"eps": base_eps}, progress=False, log_every=10 ** 6)
    values.update(shared)
    values.update(own)
    return stakes.preset("authors", method="structguard", **values)


def _load(dataset: str):
    from stakes.anchors import build_anchors
    from stakes.data import load_dataset
    from stakes.pretrain import pretrained_model

    data = load_dataset(dataset)
    model, _ = pretrained_model(dataset, data=data, progress=False)
    anchors = build_anchors(data.class_names, descriptions=dataset, encoder="minilm")
    return data, model, anchors


def run_group(job) -> list:
    """Every variant of one (setting, seed): the proxy sets first, then the runs. Each record is also
    appended to ``out_path``.partial as it is made (a killed grid resumes from it)."""
    dataset, k, seed, variants, out_path = job
    import torch

    import stakes
    from stakes.data import sample_forget_indices
    from stakes.methods import NonFiniteError, build_proxies

    torch.set_num_threads(1)
    data, model, anchors = _load(dataset)
    idx = sample_forget_indices(data.train_y, k, seed)
    forget = (data.train_x[idx], data.train_y[idx])
    retain = len(data.train_y) - k
    records, proxies, built = [], {}, {}

    def proxy_set(name):
        if name not in proxies:
            t0 = time.perf_counter()
            cfg = authors_config(dataset, seed, PROXY_SETS[name], {})
            proxies[name], _ = build_proxies(model, *forget, cfg)
            built[name] = time.perf_counter() - t0
        return proxies[name]

    for name in variants:
        table = {**BACK_TO_STAKES, **STABLE_ON_TOP}
        rec = {"dataset": dataset, "k": k, "seed": seed, "variant": name}
        t0 = time.perf_counter()
        try:
            if name == "weight_grads_off":   # cost only: the same proxies bit for bit, in less time
                a, b = proxy_set("authors"), proxy_set("weight_grads_off")
                rec.update(same_proxies=bool(torch.equal(a.x, b.x) and torch.equal(a.y, b.y)),
                           seconds_with=built["authors"], seconds_without=built["weight_grads_off"])
                records.append(rec)
                if out_path:
                    with open(out_path + ".partial", "a") as fh:
                        fh.write(json.dumps(rec) + "\n")
                continue
            if name == "stable":   # every importance pass computed, as the grid's first runs (before issue 24) did
                cfg = stakes.preset("stable", method="structguard", seed=seed, progress=False, log_every=10 ** 6,
                                    importance_passes="all")
                px = None
            elif name == "authors":
                cfg = authors_config(dataset, seed, {}, {})
                px = proxy_set("authors")
            else:
                _, shared, own, pset = table[name]
                cfg = authors_config(dataset, seed, shared, own)
                px = proxy_set(pset)
            res = stakes.unlearn(model, forget, method="structguard", anchors=anchors, config=cfg, proxies=px,
                                 retain_size=retain, eval_sets={"test": (data.test_x, data.test_y)})
            rec.update(status="ok", stopped=res.stopped, steps=res.steps, epochs=res.epochs,
                       forget_accuracy=res.metrics["forget_accuracy"], test_accuracy=res.metrics["test_accuracy"],
                       structure_drift=res.metrics.get("structure_drift"), proxies=res.proxies,
                       steps_to_zero=res.steps if res.stopped == "forget_accuracy_zero" else None)
        except NonFiniteError as err:
            rec.update(status="non-finite", error=str(err).splitlines()[0][:300])
        except Exception as err:   # recorded, the grid goes on
            rec.update(status="error", error=f"{type(err).__name__}: {err}"[:300], trace=traceback.format_exc()[-2000:])
        rec["wall_time_s"] = time.perf_counter() - t0
        rec["proxies_built_s"] = dict(built)
        records.append(rec)
        if out_path:
            with open(out_path + ".partial", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        print(f"{dataset} k={k} seed={seed} {name}: {rec.get('status', '')} {rec.get('stopped', '')} "
              f"test {rec.get('test_accuracy', float('nan')):.1f} ({rec['wall_time_s']:.0f} s)", flush=True)
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results.json"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--only", default=None, help="comma-separated variants")
    p.add_argument("--other-direction", default="digits:16", help="settings (dataset:k, comma-separated) that "
                   "also run stable's choices on top of the authors' (all: every setting)")
    args = p.parse_args(argv)
    variants = ["authors", *BACK_TO_STAKES, "weight_grads_off", *STABLE_ON_TOP, "stable"]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    done = json.load(open(args.out)) if os.path.exists(args.out) else {"runs": []}
    if os.path.exists(args.out + ".partial"):   # the records of groups a killed grid did not finish
        keys = {(r["dataset"], r["k"], r["seed"], r["variant"]) for r in done["runs"]}
        for line in open(args.out + ".partial"):
            r = json.loads(line)
            if (r["dataset"], r["k"], r["seed"], r["variant"]) not in keys:
                done["runs"].append(r)
                keys.add((r["dataset"], r["k"], r["seed"], r["variant"]))
    have = {(r["dataset"], r["k"], r["seed"], r["variant"]) for r in done["runs"]}
    other = {tuple(x.split(":")) for x in args.other_direction.split(",")} if args.other_direction != "all" else None
    jobs = []
    for dataset, k in SETTINGS:
        both = other is None or (dataset, str(k)) in other
        for seed in map(int, args.seeds.split(",")):
            todo = [v for v in variants if (dataset, k, seed, v) not in have and (both or v not in STABLE_ON_TOP)]
            if todo:
                jobs.append((dataset, k, seed, todo, args.out))
    for dataset in sorted({d for d, _ in SETTINGS}):   # pretrain and cache the models once, before the workers
        _load(dataset)
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool:
        for records in pool.imap_unordered(run_group, jobs):
            done["runs"].extend(records)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(done, fh, indent=1)
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
