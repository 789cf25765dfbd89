#!/usr/bin/env python
"""The fp32 CPU equality set: a fixed list of whole runs whose results must not move when a change
claims "fp32 CPU runs unchanged" (a policy, layout or speed change). Each run records its stop,
steps, every trajectory entry (accuracies, losses, drift), the proxies' checksum and a SHA-256 of
the deployed model's parameters and buffers, so "equal" means bit for bit.

    python .ci/equality_set.py --out now.json                 # run the set with the stakes on sys.path
    PYTHONPATH=/tmp/base python .ci/equality_set.py --out base.json   # the same set on another checkout
    python .ci/equality_set.py --compare base.json now.json   # 0 differences: exit 0
    python .ci/equality_set.py --out now.json --set channels_last=false   # every case with a shared field set

Runs on the digits data and the cached pretrained digits model (``$STAKES_CACHE``), one thread, in
about 2-4 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys


def _cases():
    base = dict(repetitions=4, pgd_steps=20, max_epochs=6, log_every=3, progress=False, backend="reference")
    small = dict(base, proxy_batch_size=6, forget_batch_size=3)   # several steps an epoch, mid-epoch reshuffles
    cases = []
    for method in ("structguard", "neggrad", "adv", "l2ul", "salun", "finetune"):
        cases.append((f"{method}-stable", method, "stable", dict(base)))
        cases.append((f"{method}-stable-small-batches", method, "stable", dict(small)))
    cases.append(("salun-weight-decay", "salun", "stable", dict(small, weight_decay=1e-2)))
    cases.append(("structguard-paper", "structguard", "paper", dict(base, eps=1.0)))
    cases.append(("structguard-paper-small-batches", "structguard", "paper", dict(small, eps=1.0)))
    cases.append(("adv-paper", "adv", "paper", dict(base, eps=1.0)))
    return cases


def run_set(overrides: dict | None = None) -> dict:
    import torch

    import stakes
    from stakes.anchors import build_anchors
    from stakes.data import load_dataset, sample_forget_indices
    from stakes.pretrain import pretrained_model

    torch.set_num_threads(1)
    data = load_dataset("digits")
    model, _ = pretrained_model("digits", data=data, progress=False)
    anchors = build_anchors(data.class_names, descriptions="digits", encoder="minilm")
    out = {}
    for seed in (0, 1):
        idx = sample_forget_indices(data.train_y, 8, seed)
        forget = (data.train_x[idx], data.train_y[idx])
        for name, method, preset, values in _cases():
            cfg = stakes.preset(preset, method=method, seed=seed, **{**values, **(overrides or {})})
            res = stakes.unlearn(model, forget, method=method, anchors=anchors, config=cfg,
                                 eval_sets={"test": (data.test_x, data.test_y)}, retain_size=len(data.train_y) - 8)
            digest = hashlib.sha256()
            for key, t in sorted(res.deployed.state_dict().items()):
                digest.update(key.encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
            out[f"{name}/seed{seed}"] = {
                "stopped": res.stopped, "steps": res.steps, "epochs": res.epochs,
                "proxies": res.proxies, "history": res.history, "metrics": res.metrics,
                "parameters_sha256": digest.hexdigest()}
            print(f"{name}/seed{seed}: {res.stopped} after {res.steps} steps", file=sys.stderr)
    return out


def compare(a: dict, b: dict) -> list:
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            diffs.append(f"{key}: only in {'the second' if key not in a else 'the first'}")
            continue
        for field in sorted(set(a[key]) | set(b[key])):
            if a[key].get(field) != b[key].get(field):
                diffs.append(f"{key}: {field} differs")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="run the set and write its results here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two results files")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a shared config field for every case, parsed as the CLI's --set")
    args = p.parse_args(argv)
    from stakes.jobs import parse_overrides

    overrides = parse_overrides(args.set)
    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        diffs = compare(a, b)
        print("\n".join(diffs) if diffs else f"0 differences in {len(a)} runs")
        return 1 if diffs else 0
    if not args.out:
        p.error("give --out FILE (run the set) or --compare A B")
    with open(args.out, "w") as fh:
        json.dump(run_set(overrides), fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
