"""``stakes compare``: every method under the same protocol, on a grid of k × seeds.

One pretrained model per data set and one proxy set per (k, seed) shared by all methods whose
proxy settings agree. A failing run is recorded with its error and the grid goes on. Writes

* ``results.json`` — one record per run with every metric and its trajectory (rewritten after
  every run, atomically, so an interrupted grid keeps what it finished);
* ``summary.md`` — mean ± std per method and k, at the stop and at matched forgetting;
* ``trajectories.png``, ``test_vs_k.png``, ``drift.png`` — drawn from ``results.json``.

Every record names its ``rank`` (0 without torchrun). Under ``torchrun --nproc-per-node=N -m
stakes compare ...`` the runs (method, k, seed), in report order, are split into N contiguous
chunks (so the runs of one (k, seed) mostly share a rank and its proxy set), each run whole on its
rank's device (``distributed=False``: no data parallelism inside a grid; its record's
``distributed`` says world size 1 and ``distributed.grid`` the grid's world size and backend).
Rank r writes its records to ``parts/rank{r}.json`` after every run; when every rank is done
(waiting on the process group's store, not in a collective, so ranks may finish hours apart) rank 0
gathers them and writes the one report, then removes ``parts/``. Rerunning a grid in the same
folder skips the runs an earlier, interrupted one finished ("ok" in ``results.json`` or
``parts/``, written with the same data set, preset, ``--set`` values, model and anchors); failed
runs are rerun.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as tdist
from tqdm.auto import tqdm

from stakes import distributed as dist_
from stakes._io import atomic_json_dump, atomic_text
from stakes.data import sample_forget_indices
from stakes.distributed import digest
from stakes.jobs import (AnchorSpec, DataSpec, ModelSpec, RunSpec, UsageError, load_data, load_model,
                         load_or_build_anchors, make_config, run_one)
from stakes.methods import available_methods, build_proxies, get_method
from stakes.proxy import AttackSettings
from stakes.metrics import accuracy, evaluate_model, matched_forgetting, membership_inference, summarize
from stakes.oracle import retrain_oracle  # noqa: F401  (also part of this module's API)

MATCHED = (25.0, 10.0, 0.0)


def median_neighbour_distance(data, forget_idx: torch.Tensor) -> float:
    """Median over forget images of the L2 distance to the nearest other training image of the same class."""
    x = data.train_x.flatten(1)
    y = data.train_y
    dists = []
    for i in forget_idx.tolist():
        same = (y == y[i]).nonzero().squeeze(1)
        same = same[same != i]
        if len(same) == 0:
            continue
        dists.append(float(torch.cdist(x[i:i + 1], x[same]).min()))
    return float(torch.tensor(dists).median()) if dists else float("nan")


def _fmt(stats: dict, digits: int = 1) -> str:
    if stats["n"] == 0:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


EMBEDDING_COLUMNS = (("recall@1", "recall@1", 1), ("recall@5", "recall@5", 1), ("mAP", "mAP", 1),
                     ("identification_accuracy", "identification", 1),
                     ("forgotten_retrieval_rate", "forgotten retrieved", 1),
                     ("pairwise_cosine_change", "pairwise cos change", 4))


def _embedding_table(ok: list, methods: list, k: int) -> list:
    """Markdown lines: retrieval / identification / pairwise-cosine change and peak memory per method,
    for the runs of ``k`` that recorded them (reports written before these fields existed have none)."""
    rows = []
    for m in methods:
        rs = [r for r in ok if r["method"] == m and r["k"] == k and r.get("retrieval")]
        if not rs:
            continue
        cells = [_fmt(summarize([r["retrieval"].get(key, float("nan")) for r in rs]), d)
                 for key, _, d in EMBEDDING_COLUMNS]
        cells.append(_fmt(summarize([(r.get("mia") or {}).get("mia_accuracy", float("nan")) for r in rs])))
        mem = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb") is not None]
        cells.append(_fmt(summarize(mem), 0) if mem else "—")
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {len(rs)} |")
    if not rows:
        return []
    head = ["Embeddings of the deployed model (METHOD.md §11): test queries against the retained training set "
            "(recall@1/5, mAP, 1-NN identification accuracy, in percent), the share of forgotten images whose nearest "
            "retained neighbour still has their class, the change of the retained embeddings' pairwise cosine "
            "matrix, the membership-inference accuracy (forget vs test, percent; 50 = chance) and the peak memory "
            "(MB; CUDA: max allocated during the run; CPU: the process's resident-set high-water mark, a lifetime "
            "maximum that a grid's later runs inherit).", "",
            "| method | " + " | ".join(name for _, name, _ in EMBEDDING_COLUMNS) + " | MIA acc | peak MB | runs |",
            "|---" * (len(EMBEDDING_COLUMNS) + 4) + "|"]
    return head + rows + [""]


def write_summary(records: list, path: str, meta: dict) -> str:
    """The mean ± std tables of ``records`` as Markdown (also returned)."""
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") != "ok"]
    methods = list(dict.fromkeys(r["method"] for r in records))
    ks = sorted({r["k"] for r in records})
    lines = [f"# stakes compare: {meta['dataset']}" + (" (SYNTHETIC data set)" if meta.get("synthetic") else ""), ""]
    lines.append(f"Preset `{meta['preset']}`, seeds {meta['seeds']}, pretrained test accuracy "
                 f"{meta.get('pretrained_test_accuracy', float('nan')):.2f} %. Accuracies in percent, through each "
                 "method's deployed model; mean ± std over seeds. \"test @ forget ≤ x %\": test accuracy at the first "
                 "logged step where at most x % of the forget set is still classified correctly (runs that got there "
                 "in parentheses). \"time s\": the run plus the proxy set it would need alone, on this machine.")
    if meta.get("note"):
        lines.append(f"Note: {meta['note']}.")
    lines.append("")
    for k in ks:
        radius = meta.get("radius", {}).get(str(k))
        lines.append(f"## k = {k}")
        if radius and radius.get("eps"):
            # results.json of earlier versions stored one number instead of one per seed
            per_seed = {key: v if isinstance(v, dict) else {"?": v} for key, v in radius.items()
                        if key in ("eps", "neighbour_distance")}
            eps = summarize(list(per_seed["eps"].values()))
            dist = summarize(list(per_seed["neighbour_distance"].values()))
            kind = "calibrated" if radius.get("calibrated") else "fixed"
            lines.append(f"PGD radius ({kind}) {eps['mean']:.3f} ± {eps['std']:.3f}; median distance from a forget "
                         f"image to its nearest same-class training image {dist['mean']:.3f} ± {dist['std']:.3f} "
                         f"(mean ± std over seeds).")
        lines.append("")
        lines.append("| method | test @ stop | forget @ stop | retain @ stop | reached 0 % | test @ forget ≤ 25 % "
                     "| test @ ≤ 10 % | test @ 0 % | MIA AUC | drift | steps | time s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m in methods:
            rs = [r for r in ok if r["method"] == m and r["k"] == k]
            n_all = len([r for r in records if r["method"] == m and r["k"] == k])
            if not rs:
                lines.append(f"| {m} | failed ({n_all} runs) | | | | | | | | | | |")
                continue
            reached = sum(1 for r in rs if r["forget_accuracy"] == 0.0)
            matched = [matched_forgetting(r["history"], MATCHED) for r in rs]
            cells = [
                _fmt(summarize([r["test_accuracy"] for r in rs])),
                _fmt(summarize([r["forget_accuracy"] for r in rs])),
                _fmt(summarize([r["retain_accuracy"] for r in rs])),
                f"{reached}/{len(rs)}",
            ]
            for t in MATCHED:
                key = f"test_at_forget<={t:g}"
                vals = [mf[key] for mf in matched if mf.get(key) is not None]
                cells.append(f"{_fmt(summarize(vals))} ({len(vals)}/{len(rs)})" if vals else f"— (0/{len(rs)})")
            cells.append(_fmt(summarize([(r.get("mia") or {}).get("mia_auc", float("nan")) for r in rs]), 3))
            drifts = [r["structure_drift"] for r in rs if r.get("structure_drift") is not None]
            cells.append(_fmt(summarize(drifts), 4) if drifts else "—")
            cells.append(_fmt(summarize([r["steps"] for r in rs]), 0))
            cells.append(_fmt(summarize([r.get("wall_time_with_proxies_s", r["wall_time_s"]) for r in rs]), 1))
            if len(rs) < n_all:
                cells[0] += f" ({n_all - len(rs)} failed)"
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.extend(_embedding_table(ok, methods, k))
    if failed:
        lines.append("## Failed runs")
        for r in failed:
            lines.append(f"- {r['method']} k={r['k']} seed={r['seed']}: {r.get('error', '?')}")
        lines.append("")
    text = "\n".join(lines)
    atomic_text(text + "\n", path)
    return text


def plot_report(records: list, out_dir: str) -> list:
    """Draw the report's PNGs from ``records``; returns the paths written."""
    import matplotlib   # only for drawing: a grid that fails before the report does not pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return []
    methods = list(dict.fromkeys(r["method"] for r in ok))
    ks = sorted({r["k"] for r in ok})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    paths = []

    def per_k_trajectories(x_key, y_key, xlabel, ylabel, name, *, mark_end=False, invert_x=False):
        """One panel per k, one line per run: ``y_key`` against ``x_key`` along each trajectory."""
        fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 4), squeeze=False)
        for ax, k in zip(axes[0], ks):
            for m in methods:
                for j, r in enumerate(x for x in ok if x["method"] == m and x["k"] == k):
                    h = [e for e in r["history"] if y_key in e]
                    ax.plot([e[x_key] for e in h], [e[y_key] for e in h], "-", color=colors[m], alpha=0.6, lw=1,
                            label=m if j == 0 else None)
                    if mark_end and h:
                        ax.plot([h[-1][x_key]], [h[-1][y_key]], "o", color=colors[m], ms=4)
            if invert_x:
                ax.invert_xaxis()
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"k = {k}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    per_k_trajectories("forget_accuracy", "test_accuracy", "forget accuracy % (trajectory →)", "test accuracy %",
                       "trajectories.png", mark_end=True, invert_x=True)

    fig, ax = plt.subplots(figsize=(5, 4))
    for m in methods:
        means, stds = [], []
        for k in ks:
            vals = torch.tensor([r["test_accuracy"] for r in ok if r["method"] == m and r["k"] == k])
            means.append(float(vals.mean()) if len(vals) else float("nan"))
            stds.append(float(vals.std()) if len(vals) > 1 else 0.0)
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=m, color=colors[m])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (forget set size)")
    ax.set_ylabel("test accuracy % at the stop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "test_vs_k.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    per_k_trajectories("step", "structure_drift", "step", "structure drift (held-out)", "drift.png")
    return paths


def _run_key(record: dict) -> tuple:
    return record.get("method"), record.get("k"), record.get("seed")


def _merge_radius(dst: dict, src: dict, ks=None, seeds=None) -> dict:
    """Merge the per-(k, seed) radius entries of ``src`` into ``dst`` (restricted to ``ks`` × ``seeds``
    when given); returns ``dst``."""
    for k, rad in (src or {}).items():
        if ks is not None and k not in ks:
            continue
        if not isinstance(rad, dict):
            continue
        out = dst.setdefault(k, {"calibrated": rad.get("calibrated"), "eps": {}, "neighbour_distance": {}})
        for field in ("eps", "neighbour_distance"):
            v = rad.get(field)
            if isinstance(v, dict):
                out[field].update({s: x for s, x in v.items() if seeds is None or s in seeds})
    return dst


def _parts_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "parts")


def _finished_runs(out_dir: str, settings: str, grid_keys: set, ks: set, seeds: set) -> tuple:
    """What an earlier, interrupted grid in ``out_dir`` finished: ``(records, radius, notes, had_parts)``.

    Reads ``results.json`` and any ``parts/rank*.json`` a distributed grid left; keeps the records of
    this grid with status "ok" whose report was written with the same settings (data set, preset,
    ``--set`` overrides, model and anchors), later files winning."""
    parts = sorted(glob.glob(os.path.join(_parts_dir(out_dir), "rank*.json")))
    sources = [p for p in [os.path.join(out_dir, "results.json")] + parts if os.path.isfile(p)]
    kept: dict = {}
    radius: dict = {}
    notes = []
    for path in sources:
        try:
            meta, runs = _read_results(path)
        except (OSError, ValueError):
            notes.append(f"{path} is not a stakes compare result; its runs are not reused")
            continue
        if meta.get("settings") != settings:
            if runs:
                notes.append(f"{path} was written with other settings (data set, preset, --set, model or anchors, "
                             "or by an older version); its runs are rerun")
            continue
        for r in runs:
            if isinstance(r, dict) and r.get("status") == "ok" and _run_key(r) in grid_keys:
                kept[_run_key(r)] = r
        _merge_radius(radius, meta.get("radius"), ks, seeds)
    return kept, radius, notes, bool(parts) or os.path.isdir(_parts_dir(out_dir))


_WAIT_SEQ = [0]


def _wait_for_all_ranks(ctx, poll_s: float = 1.0) -> None:
    """Wait until every rank got here, however long that takes (a grid's ranks finish hours apart,
    beyond any collective timeout): each rank adds 1 to a key of the process group's store and polls
    it until it reaches the world size. Without a store (a group not made by init_process_group) a
    gloo ``monitored_barrier`` with a month's timeout, else a plain barrier."""
    if not ctx.enabled:
        return
    _WAIT_SEQ[0] += 1
    key = f"stakes_compare_done/{dist_.restart_count()}/{_WAIT_SEQ[0]}"
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception:   # a private helper: fall back to a barrier if it is gone
        store = None
    if store is None:
        if ctx.backend == "gloo":
            with dist_._collective("monitored_barrier"):
                tdist.monitored_barrier(timeout=datetime.timedelta(days=30))
        else:
            dist_.barrier(ctx)
        return
    with dist_._collective("the end-of-grid wait on the store"):
        store.add(key, 1)
        while store.add(key, 0) < ctx.world_size:
            time.sleep(poll_s)


def _grid_settings(job: "CompareJob", data, model, anchors) -> dict:
    """Digests of what decides a run's result besides (method, k, seed)."""
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    return {"dataset": digest([data.name, list(data.train_x.shape), data.train_y, list(data.test_x.shape)]),
            "preset": digest(job.run.preset),
            "set overrides": digest({k: repr(v) for k, v in job.run.overrides.items()}),
            "model": digest({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}),
            "anchors": digest(anchors if isinstance(anchors, torch.Tensor) else repr(anchors))}


# ----------------------------------------------------------------------------- the grid's jobs


@dataclass
class CompareJob:
    """A ``stakes compare`` grid: methods (and their ablations) × k × seeds, and the retrain oracle."""

    data: DataSpec
    model: ModelSpec
    anchors: AnchorSpec
    run: RunSpec
    methods: list
    ks: list
    seeds: list
    out: str
    ablations: list = field(default_factory=list)   # names of method ablations (StructGuard: warm-start, projector)
    retrain: bool = False
    dist_timeout: float = dist_.DEFAULT_TIMEOUT_S


@dataclass
class _Grid:
    """What every run of a grid shares (the loaded data, model and anchors), and the per-(k, seed)
    state of this process: the forget set, the pretrained model's figures and the proxy sets."""

    job: CompareJob
    data: object
    model: object
    anchors: object
    radius: dict = field(default_factory=dict)
    at: Optional[tuple] = None
    forget_idx: Optional[torch.Tensor] = None
    pretrained: Optional[dict] = None
    proxies: dict = field(default_factory=dict)

    def select(self, k: int, seed: int) -> None:
        """The (k, seed) whose forget set, pretrained figures and proxies are at hand."""
        if self.at != (k, seed):
            self.at, self.proxies, self.pretrained = (k, seed), {}, None
            self.forget_idx = sample_forget_indices(self.data.train_y, k, seed)


@dataclass(frozen=True)
class MethodRun:
    """One unlearning run of the grid: ``method`` (with ``options`` changed: an ablation ``label``)
    on the forget set of (k, seed)."""

    label: str
    method: str
    k: int
    seed: int
    options: tuple = ()   # (option, value) pairs of the ablation

    def execute(self, grid: _Grid) -> dict:
        data, job = grid.data, grid.job
        grid.select(self.k, self.seed)
        if grid.pretrained is None:
            grid.pretrained = evaluate_model(grid.model, data, grid.forget_idx)
        cfg = make_config(job.run, self.method, seed=self.seed, grid=job.methods)
        if cfg.log_every is None:   # the report's trajectories and matched-forgetting figures need one
            cfg = cfg.replace(log_every=5)
        if self.options:
            cfg = cfg.with_method_options(get_method(self.method).key, **dict(self.options))
        key = (cfg.eps, cfg.repetitions, cfg.pgd_steps, cfg.pgd_step_size, cfg.target_success,
               AttackSettings.from_config(cfg))
        if key not in grid.proxies:
            # each rank runs whole runs on its own device: no data parallelism inside a grid
            grid.proxies[key] = build_proxies(grid.model, data.train_x[grid.forget_idx], data.train_y[grid.forget_idx],
                                              cfg, distributed=False)
        proxies, ptimes = grid.proxies[key]
        record, _ = run_one(data, grid.model, grid.anchors, self.method, self.k, self.seed, proxies=proxies, cfg=cfg,
                            pretrained=grid.pretrained, distributed=False)
        record["method"] = self.label
        record["timings"].update({f"shared_{n}": v for n, v in ptimes.items()})
        # the proxy set is shared, but each method that trains on it would have had to build it alone
        uses_proxies = get_method(self.method).uses_proxies
        seconds = sum(v for n, v in ptimes.items() if n.endswith("_s"))   # not the PGD batch size it records
        record["wall_time_with_proxies_s"] = record["wall_time_s"] + uses_proxies * seconds
        record["status"] = "ok"
        radius = grid.radius.setdefault(str(self.k), {"calibrated": cfg.eps is None, "eps": {}, "neighbour_distance": {}})
        if str(self.seed) not in radius["eps"]:
            radius["eps"][str(self.seed)] = round(proxies.eps, 3)
            radius["neighbour_distance"][str(self.seed)] = round(median_neighbour_distance(data, grid.forget_idx), 3)
        return record


@dataclass(frozen=True)
class RetrainRun:
    """The retrain oracle of (k, seed): trained from scratch without the forget set (METHOD.md §10)."""

    k: int
    seed: int
    label: str = "retrain"

    def execute(self, grid: _Grid) -> dict:
        t0 = time.perf_counter()
        data = grid.data
        grid.select(self.k, self.seed)
        oracle = retrain_oracle(data, grid.forget_idx, self.seed, device=grid.job.run.device)
        metrics = evaluate_model(oracle, data, grid.forget_idx)
        fx, fy = data.train_x[grid.forget_idx], data.train_y[grid.forget_idx]
        return {"method": self.label, "k": self.k, "seed": self.seed, "status": "ok", **metrics,
                "mia": membership_inference(oracle, fx, fy, data.test_x, data.test_y, seed=self.seed),
                "structure_drift": None, "steps": 0, "wall_time_s": time.perf_counter() - t0,
                "history": [{"step": 0, **metrics}]}


def plan_grid(job: CompareJob) -> list:
    """The grid's runs in report order: for each (k, seed), every method, the ablations its methods
    declare for ``job.ablations``, and the retrain oracle when asked."""
    variants = [(m, m, ()) for m in job.methods]
    for name in job.ablations:
        owners = [m for m in job.methods if name in get_method(m).ablation_names]
        if not owners:
            declared = {m: list(get_method(m).ablation_names) for m in available_methods()}
            raise UsageError(f"--ablate {name}: no method of this grid ({', '.join(job.methods)}) has that ablation "
                             f"(the registered methods have {declared})")
        for m in owners:
            method = get_method(m)
            options = method.options_for(make_config(job.run, m, seed=0, grid=job.methods))
            try:
                variant = method.ablation(name, options)
            except ValueError as err:
                raise UsageError(f"--ablate {name}: {err}") from None
            variants.append((variant.label, m, tuple(sorted(variant.options.items()))))
    runs = []
    for k in job.ks:
        for seed in job.seeds:
            runs += [MethodRun(label, m, k, seed, options) for label, m, options in variants]
            if job.retrain:
                runs.append(RetrainRun(k, seed))
    return runs


def _run_safely(run, grid: _Grid, rank: int, grid_record: dict, distributed: bool) -> dict:
    """One run's record; a failure is recorded with its error and the grid goes on."""
    try:
        record = run.execute(grid)
    except Exception as err:
        record = {"method": run.label, "k": run.k, "seed": run.seed, "status": "failed",
                  "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)}
    record["rank"] = rank
    if distributed:   # the run itself is on one process (its own "distributed" record says so); the grid is not
        own = record.get("distributed") if isinstance(record.get("distributed"), dict) else \
            {"world_size": 1, "backend": None}
        record["distributed"] = {**own, "grid": grid_record}
    return record


# ----------------------------------------------------------------------------- running a grid


def run_compare(job: CompareJob) -> int:
    """The ``stakes compare`` command (see the module docstring).

    Under ``torchrun`` (a process group of world size > 1) the grid's runs (method, k, seed) are
    split into contiguous chunks over the ranks, each run whole on its rank's device; every rank
    writes its records to ``OUT/parts/rank{r}.json`` after every run, and rank 0 merges them into
    the one report. A rerun in the same folder (serial or distributed) skips the runs an earlier,
    interrupted grid finished with the same settings (failed runs are rerun).
    """
    initialised_here = False
    if dist_.wants_group() and not (tdist.is_available() and tdist.is_initialized()):
        # the command line normally does this; harmless (a no-op) when a group already exists
        _, job.run.device = dist_.init_from_env(job.run.device, backend="gloo", timeout_s=job.dist_timeout)
        initialised_here = True
    try:
        return _run_compare(job, dist_.current())
    finally:
        if initialised_here:
            dist_.shutdown()


def _run_compare(job: CompareJob, ctx) -> int:
    valid = available_methods()
    bad = [m for m in job.methods if m not in valid]
    if bad or not job.methods:
        raise UsageError(f"--methods: unknown {bad or 'empty list'}; expected a comma-separated subset of {valid}")
    data = load_data(job.data)
    for k in job.ks:
        if not 1 <= k <= len(data.train_y):
            raise UsageError(f"--k must be between 1 and the training set size {len(data.train_y)}, got {k}")
    os.makedirs(job.out, exist_ok=True)
    with dist_.main_first(ctx):   # rank 0 first: it may pretrain and cache the default model and anchors
        model, _ = load_model(job.model, data)
        anchors, anchor_meta = load_or_build_anchors(job.anchors, data, model)
    runs = plan_grid(job)
    labels = list(dict.fromkeys(r.label for r in runs if isinstance(r, MethodRun)))
    settings_parts = _grid_settings(job, data, model, anchors)
    settings = dist_.digest(settings_parts)
    # every rank must have been given the same grid (same command, same files)
    dist_.check_same_across_ranks({**settings_parts, "methods": dist_.digest(labels), "k": dist_.digest(list(job.ks)),
                                   "seeds": dist_.digest(list(job.seeds)), "retrain": dist_.digest(bool(job.retrain))},
                                  ctx, "compare grid")
    meta = {"dataset": data.name, "synthetic": bool(getattr(data, "synthetic", False)), "preset": job.run.preset,
            "seeds": job.seeds, "ks": job.ks, "methods": labels, "anchors": anchor_meta,
            "pretrained_test_accuracy": accuracy(model, data.test_x, data.test_y), "radius": {}}
    order = {(r.label, r.k, r.seed): i for i, r in enumerate(runs)}
    finished = _resume_grid(job, ctx, meta, settings, order)
    todo = [r for r in runs if (r.label, r.k, r.seed) not in finished]
    mine = dist_.contiguous_chunks(todo, ctx.world_size)[ctx.rank] if ctx.enabled else todo
    meta["settings"] = settings
    meta["distributed"] = ctx.record()
    grid = _Grid(job, data, model, anchors)
    start = time.perf_counter()
    my_records = _run_share(mine, grid, ctx, meta, finished, order)
    records = _gather(job, ctx, meta, grid, my_records, finished, order, start)
    if records is None:   # a rank other than 0: rank 0 writes the report
        return 0
    return 1 if _report(job, meta, records, finished) else 0


def _ordered(records, order: dict) -> list:
    return sorted(records, key=lambda r: order.get(_run_key(r), len(order)))


def _resume_grid(job: CompareJob, ctx, meta: dict, settings: str, order: dict) -> dict:
    """What an interrupted earlier grid in ``job.out`` finished ({key: record}, rank 0 reads, every
    rank learns the keys); a distributed grid's parts are folded into results.json first."""
    finished: dict = {}
    if ctx.is_main:
        finished, old_radius, notes, had_parts = _finished_runs(
            job.out, settings, set(order), {str(k) for k in job.ks}, {str(s) for s in job.seeds})
        for note in notes:
            print(f"stakes compare: {note}", flush=True)
        _merge_radius(meta["radius"], old_radius)
        if had_parts:
            # fold the parts of an interrupted distributed grid into results.json before this grid's ranks
            # write their own (so that an interruption of this grid loses nothing either)
            atomic_json_dump({"meta": {**meta, "settings": settings}, "runs": _ordered(finished.values(), order)},
                             os.path.join(job.out, "results.json"))
            shutil.rmtree(_parts_dir(job.out), ignore_errors=True)
        if finished:
            print(f"stakes compare: {len(finished)} of {len(order)} runs already finished in {job.out}; skipping "
                  f"them, running the other {len(order) - len(finished)}", flush=True)
    done_keys = dist_.broadcast_object(sorted(finished), ctx)
    return {tuple(key): finished.get(tuple(key)) for key in done_keys}


def _run_share(mine: list, grid: _Grid, ctx, meta: dict, finished: dict, order: dict) -> list:
    """Run this rank's share of the grid, saving after every run (a part file per rank, or results.json)."""
    job = grid.job
    my_records: list = []
    part_path = os.path.join(_parts_dir(job.out), f"rank{ctx.rank}.json")
    bar = tqdm(total=len(mine), desc=f"compare rank {ctx.rank}" if ctx.enabled else "compare",
               disable=not job.run.progress)
    for run in mine:
        bar.set_postfix(method=run.label, k=run.k, seed=run.seed)
        my_records.append(_run_safely(run, grid, ctx.rank, ctx.record(), ctx.enabled))
        if ctx.enabled:
            atomic_json_dump({"meta": {**meta, "radius": grid.radius, "rank": ctx.rank}, "runs": my_records},
                             part_path)
        else:
            _merge_radius(meta["radius"], grid.radius)
            atomic_json_dump({"meta": meta, "runs": _ordered(list(finished.values()) + my_records, order)},
                             os.path.join(job.out, "results.json"))
        bar.update(1)
    bar.close()
    return my_records


def _gather(job: CompareJob, ctx, meta: dict, grid: _Grid, my_records: list, finished: dict, order: dict,
            start: float):
    """Every record of the grid on rank 0 (None on the other ranks), results.json written."""
    if ctx.enabled:
        # ranks finish hours apart: wait on the store, not in a collective that would time out
        _wait_for_all_ranks(ctx)
        gathered = dist_.all_gather_object({"runs": my_records, "radius": grid.radius}, ctx)
        records = None
        if ctx.is_main:
            for part in gathered:
                _merge_radius(meta["radius"], part["radius"])
            records = _ordered(list(finished.values()) + [r for part in gathered for r in part["runs"]], order)
            meta["wall_time_s"] = time.perf_counter() - start
            atomic_json_dump({"meta": meta, "runs": records}, os.path.join(job.out, "results.json"))
        dist_.barrier(ctx)   # results.json holds every rank's runs: the parts can go
        try:
            os.remove(os.path.join(_parts_dir(job.out), f"rank{ctx.rank}.json"))
        except FileNotFoundError:
            pass
        if ctx.is_main:
            shutil.rmtree(_parts_dir(job.out), ignore_errors=True)
        return records
    records = _ordered(list(finished.values()) + my_records, order)
    meta["wall_time_s"] = time.perf_counter() - start
    atomic_json_dump({"meta": meta, "runs": records}, os.path.join(job.out, "results.json"))
    return records


def _report(job: CompareJob, meta: dict, records: list, finished: dict) -> int:
    """summary.md and the plots, printed; returns the number of failed runs."""
    text = write_summary(records, os.path.join(job.out, "summary.md"), meta)
    plots = plot_report(records, job.out)
    print(text)
    print(f"\nreport -> {job.out}/ (results.json, summary.md, {', '.join(os.path.basename(p) for p in plots)})")
    if finished:
        print(f"{len(finished)} of {len(records)} runs were finished by an earlier run of this grid and skipped")
    n_failed = sum(1 for r in records if r.get("status") != "ok")
    if n_failed:
        print(f"{n_failed} of {len(records)} runs failed; see summary.md")
    return n_failed


def load_report(out_dir: str) -> tuple:
    """``(meta, runs)`` of a report folder's ``results.json``, with a clear error if it is not one."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results.json in {out_dir!r} (run `stakes compare --out {out_dir}` first)")
    return _read_results(path)


def _read_results(path: str) -> tuple:
    """``(meta, runs)`` of a compare results file (``results.json`` or a rank's part); ValueError
    naming the file if it is not one."""
    try:
        with open(path) as fh:
            payload = json.load(fh)
        meta, records = payload["meta"], payload["runs"]
        if not isinstance(meta, dict) or not isinstance(records, list):
            raise TypeError("meta must be an object and runs a list")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a stakes compare result ({err})") from None
    return meta, records


def merge_reports(dirs: list, out_dir: str) -> tuple:
    """Merge the ``results.json`` of grids run separately (other seeds, other k, other methods; on
    several processes or machines) into one report in ``out_dir``; returns ``(meta, runs)``.

    The parts must share the data set, preset and pretrained model, and no (method, k, seed) may
    appear twice.
    """
    if not dirs:
        raise ValueError("merge_reports needs at least one report folder")
    meta: dict = {}
    runs: list = []
    seen: dict = {}
    for d in dirs:
        m, rs = load_report(d)
        if not meta:
            meta = {**m, "radius": {}, "seeds": [], "ks": [], "methods": [], "wall_time_s": 0.0, "merged_from": []}
            meta.pop("note", None)
        for key in ("dataset", "preset"):
            if m.get(key) != meta.get(key):
                raise ValueError(f"cannot merge {d!r}: its {key} is {m.get(key)!r} but {dirs[0]!r} has "
                                 f"{meta.get(key)!r}")
        if m.get("settings") != meta.get("settings"):
            meta.pop("settings", None)   # parts run with other --set values: a rerun here must not reuse runs
        a, b = m.get("pretrained_test_accuracy"), meta.get("pretrained_test_accuracy")
        if a is not None and b is not None and abs(a - b) > 1e-6:
            raise ValueError(f"cannot merge {d!r}: its pretrained model differs (test accuracy {a:.4f} % vs {b:.4f} % "
                             f"in {dirs[0]!r})")
        for r in rs:
            key = (r.get("method"), r.get("k"), r.get("seed"))
            if key in seen:
                raise ValueError(f"cannot merge {d!r}: method {key[0]!r}, k={key[1]}, seed={key[2]} is also in "
                                 f"{seen[key]!r}")
            seen[key] = d
        runs.extend(rs)
        meta["seeds"] = sorted(set(meta["seeds"]) | set(m.get("seeds", [])))
        meta["ks"] = sorted(set(meta["ks"]) | set(m.get("ks", [])))
        meta["methods"] += [x for x in m.get("methods", []) if x not in meta["methods"]]
        meta["wall_time_s"] += float(m.get("wall_time_s") or 0.0)
        meta["merged_from"].append(os.path.basename(os.path.normpath(d)))
        if m.get("note") and m["note"] not in (meta.get("note") or ""):
            meta["note"] = "; ".join(filter(None, [meta.get("note"), m["note"]]))
        for k, rad in (m.get("radius") or {}).items():
            dst = meta["radius"].setdefault(k, {"calibrated": rad.get("calibrated"), "eps": {},
                                                "neighbour_distance": {}})
            for field in ("eps", "neighbour_distance"):
                v = rad.get(field)
                dst[field].update(v if isinstance(v, dict) else {})
    os.makedirs(out_dir, exist_ok=True)
    atomic_json_dump({"meta": meta, "runs": runs}, os.path.join(out_dir, "results.json"))
    return meta, runs


def rerender_report(out_dir: str) -> str:
    """Rewrite ``summary.md`` and the PNGs of a report folder from its ``results.json``."""
    meta, records = load_report(out_dir)
    text = write_summary(records, os.path.join(out_dir, "summary.md"), meta)
    plot_report(records, out_dir)
    return text

