"""Compiling launches for a target with no GPU, reading them (the vendor's reader) and gating them.

A stand-in Triton driver names the target (``GPUTarget("cuda", 90, 32)``, ``GPUTarget("hip",
"gfx942", 64)``): Triton compiles for it on any machine. Many launches share one compiled kernel
(Triton specialises on dtypes, constexprs and integer arguments equal to 1 or divisible by 16 that
a kernel does not exempt, not on sizes): the JIT's in-memory cache compiles each distinct kernel
once per target, and each distinct compiled kernel (``CompiledKernel.hash``) is read once.

(target, op) tasks are spread over spawned worker processes (:func:`run`), which compile with the
interpreter off whatever ``TRITON_INTERPRET`` says here, and hand back one row per distinct
(op, kernel, dtype, compiled kernel, verdict) with the number of case launches it stands for, and
every case of a failing one. On a machine with a GPU (CUDA or ROCm) the card's target is compiled
with its real driver, which also loads every kernel (the ``load`` gate).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from fused._ops import OP_NAMES, declaration
from fused._targets import Target, live_target, target_of
from fused.preflight.gates import failed_gates
from fused.preflight.specs import SHORT_DTYPE, format_case, format_shape, module_spec


class StandInDriver:
    """Enough of a Triton driver to compile for ``target`` with no GPU: the target, and a device id
    distinct per target (the JIT caches kernels per device)."""

    def __init__(self, target: Target):
        self.target = target

    def get_current_device(self):
        return 1000 + hash(self.target.name) % 100_000

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target.gpu_target()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def require_compiler() -> None:
    """Refuse to run under the Triton interpreter (kernels would be interpreted functions)."""
    if interpreter_on():
        raise RuntimeError(
            "the preflight compiles kernels, which the Triton interpreter cannot: unset TRITON_INTERPRET "
            "before importing the kernel modules (python -m fused preflight does this in its workers)"
        )


def one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:400]


def _reader(target: Target, workdir: str):
    if target.is_amd:
        from fused.preflight.amd import AmdReader

        return AmdReader(target, workdir)
    from fused.preflight.nvidia import NvidiaReader

    return NvidiaReader(target, workdir)


class TargetChecker:
    """Compiles and checks launches for one target (a stand-in driver, or the live card's own).

    :meth:`check` compiles (the JIT caches each distinct kernel) and hands new kernels to the
    vendor's reader; :meth:`finish` gates the rows.
    """

    def __init__(self, target, live: Optional[Dict[str, Any]] = None):
        require_compiler()
        self.target = target_of(target)
        self.live = live if live and live.get("arch") == self.target.name else None
        if self.live:
            self.target = live_target(self.target.name, self.live.get("shared_limit"))
        self.analyses: Dict[str, Dict[str, Any]] = {}
        self._rows: List[Tuple[Dict[str, Any], Any]] = []
        self.compiled = 0
        self.compile_s = 0.0
        self._last_labels: Tuple[Any, Tuple[str, str]] = (None, ("", ""))

    def __enter__(self):
        from triton.runtime import driver

        self.workdir = tempfile.mkdtemp(prefix="fused-preflight-")
        self.reader = _reader(self.target, self.workdir)
        self._previous = driver._active  # None when no driver was made yet (no GPU: none can be)
        if self.live is None:
            driver.set_active(StandInDriver(self.target))
        else:
            driver.reset_active()  # the card's own driver
        return self

    def __exit__(self, *exc):
        from triton.runtime import driver

        driver._active = self._previous
        shutil.rmtree(self.workdir, ignore_errors=True)
        return False

    def _labels(self, op: str, spec: Dict[str, Any]) -> Tuple[str, str]:
        """(shape, case) of a spec, formatted once per case (a case has several launches)."""
        if self._last_labels[0] is not spec:
            known = op in OP_NAMES
            self._last_labels = (spec, (format_shape(op, spec) if known else "",
                                        format_case(op, spec) if known else ""))
        return self._last_labels[1]

    def _row(self, op: str, spec: Dict[str, Any], kernel: str, config: str = "", kind: str = "") -> Dict[str, Any]:
        dtype = spec.get("dtype")
        shape, case = self._labels(op, spec)
        return {"op": op, "shape": shape, "dtype": SHORT_DTYPE.get(dtype, dtype), "arch": self.target.name,
                "vendor": self.target.vendor, "live": self.live is not None, "kernel": kernel, "config": config,
                "kind": kind, "case": case, "hash": None}

    def failure(self, op: str, spec: Dict[str, Any], kernel: str, error: BaseException) -> None:
        """A case whose launches could not be planned: a failing 'compile' row."""
        row = self._row(op, spec, kernel)
        row.update(verdict="compile", failed=["compile"], error=one_line(error))
        self._rows.append((row, None))

    def no_launch(self, op: str, spec: Dict[str, Any]) -> None:
        """A case the launcher runs no kernel for (a passing row, so the case is accounted for)."""
        row = self._row(op, spec, "(no launch)")
        row.update(verdict="ok", failed=[], error=None)
        self._rows.append((row, None))

    def check(self, op: str, spec: Dict[str, Any], launch) -> None:
        """Compile ``launch`` (cached by the JIT), read it (cached by hash); gated in finish()."""
        row = self._row(op, spec, launch.name, launch.describe(), launch.kind)
        t0 = time.perf_counter()
        try:
            ck = launch.compile()
        except Exception as e:  # noqa: BLE001 - any compile failure is a verdict, not a crash
            self.compile_s += time.perf_counter() - t0
            row.update(verdict="compile", failed=["compile"], error=one_line(e))
            self._rows.append((row, None))
            return
        seconds = time.perf_counter() - t0
        self.compile_s += seconds
        if ck.hash not in self.analyses:
            self.compiled += 1
            self.analyses[ck.hash] = dict(shared=int(ck.metadata.shared), compile_s=round(seconds, 3),
                                          load_error=self._load(ck) if self.live else None)
            try:
                self.reader.add(ck.hash, ck)
            except Exception as e:  # noqa: BLE001 - an unreadable kernel fails, it does not crash the run
                self.analyses[ck.hash]["read_error"] = one_line(e)
        row["hash"] = ck.hash
        self._rows.append((row, launch))

    def finish(self) -> List[Dict[str, Any]]:
        """Every row so far, gated."""
        for key, analysis in self.reader.analyses().items():
            self.analyses[key].update(analysis)
        rows = []
        for row, launch in self._rows:
            if launch is not None:
                a = self.analyses[row["hash"]]
                if a.get("read_error"):
                    row.update(verdict="compile", failed=["compile"], error=a["read_error"])
                    rows.append(row)
                    continue
                row.update({k: a.get(k) for k in (
                    "registers", "sgprs", "waves", "spill_bytes", "local_bytes", "spill_instructions", "traps", "stores", "shared",
                    "static_shared", "tensor_core", "widest_load", "widest_store", "ld_vectors", "st_vectors",
                    "compile_s")})
                row.update(shared_limit=self.target.shared_limit, error=a["load_error"])
                failed = failed_gates(launch, self.target, row)
                if a["load_error"]:
                    failed.append("load")
                row["failed"] = failed
                row["verdict"] = "ok" if not failed else ",".join(failed)
            rows.append(row)
        self._rows = []
        return rows

    @staticmethod
    def _load(ck) -> Optional[str]:
        """On the live card: let the driver load the kernel (it checks shared memory and registers)."""
        try:
            ck._init_handles()
        except Exception as e:  # noqa: BLE001
            return one_line(e)
        return None


def check_launches(launches: Iterable, arch, op: str = "custom", spec: Optional[Dict[str, Any]] = None,
                   live: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """Compile and check ``launches`` (fused._launch.Launch) for ``arch``: one row each."""
    spec = spec or {}
    with TargetChecker(arch, live) as checker:
        for launch in launches:
            checker.check(op, spec, launch)
        return checker.finish()


def group_rows(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (op, target, kernel, dtype, compiled kernel or error, verdict), in first-seen
    order, with ``count`` (the case launches it stands for) and ``cases``: every case of a failing
    group, the first one of a passing group."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    for row in rows:
        key = (row["op"], row["arch"], row["kernel"], row["dtype"], row.get("hash") or row.get("error"),
               row["verdict"], row.get("ld_vectors_needed"), row.get("st_vectors_needed"))
        group = groups.get(key)
        if group is None:
            group = groups[key] = dict(row, count=0, cases=[])
        group["count"] += row.get("count", 1)
        if row["failed"] or not group["cases"]:
            group["cases"] += row.get("cases", [row["case"]])
    return list(groups.values())


def run_cases(arch, cases: Sequence[Tuple[str, Dict[str, Any]]], live=None, progress=None):
    """Every case on one target -> (grouped rows, distinct kernels compiled, seconds compiling)."""
    with TargetChecker(arch, live) as checker:
        for op, spec in cases:
            try:
                launches = list(declaration(op).launches(module_spec(op, spec), checker.target))
            except Exception as e:  # noqa: BLE001 - a plan that cannot be built fails its case
                checker.failure(op, spec, "(plan)", e)
            else:
                if not launches:
                    checker.no_launch(op, spec)
                for launch in launches:
                    checker.check(op, spec, launch)
            if progress is not None:
                progress(1)
        return group_rows(checker.finish()), checker.compiled, checker.compile_s


# ----------------------------------------------------------------------------- worker processes

_QUEUE = None


def _worker_init(queue) -> None:
    global _QUEUE
    _QUEUE = queue
    os.environ.pop("TRITON_INTERPRET", None)


def _worker(arch: str, cases, live):
    pending = [0]

    def progress(n):  # batched: a queue message per case would cost more than a cached compile
        pending[0] += n
        if _QUEUE is not None and pending[0] >= 200:
            _QUEUE.put(pending[0])
            pending[0] = 0

    t0 = time.perf_counter()
    rows, compiled, compile_s = run_cases(arch, cases, live, progress)
    if _QUEUE is not None and pending[0]:
        _QUEUE.put(pending[0])
    return rows, compiled, compile_s, time.perf_counter() - t0


def live_card() -> Optional[Dict[str, Any]]:
    """The local GPU (target name, product name, shared-memory limit a block), or None. A ROCm
    build of torch reports AMD cards as CUDA devices: ``torch.version.hip`` and the card's
    ``gcnArchName`` say which."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        if getattr(torch.version, "hip", None):
            from fused._targets import amd_arch_name

            target = target_of(amd_arch_name(props.gcnArchName))
            limit = getattr(props, "shared_memory_per_block", None)
        else:
            target = target_of(10 * props.major + props.minor)
            limit = getattr(props, "shared_memory_per_block_optin", None)
        return {"arch": target.name, "name": props.name, "shared_limit": int(limit or target.shared_limit)}
    except Exception:  # noqa: BLE001 - no usable card: static checks only
        return None


def run(targets: Sequence[Target], cases, jobs: int, live=None, show_progress: bool = True):
    """All cases on all targets over ``jobs`` spawned worker processes -> (grouped rows, per-target
    stats). One task per (target, op), the heaviest first (``DECLARATION.weight`` × cases), so the
    pool stays balanced; a target's ops share no kernel, so splitting them compiles nothing twice."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    total = len(cases) * len(targets)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="preflight", unit="case", file=sys.stderr, dynamic_ncols=True)

    def pump():
        while True:
            n = queue.get()
            if n is None:
                return
            if bar is not None:
                bar.update(n)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
    by_op: Dict[str, List[Tuple[int, Tuple[str, Dict[str, Any]]]]] = defaultdict(list)
    for i, case in enumerate(cases):
        by_op[case[0]].append((i, case))
    tasks = [(t, chosen) for op, chosen in by_op.items() for t in targets]
    tasks.sort(key=lambda tc: -declaration(tc[1][0][1][0]).weight * len(tc[1]))
    done: Dict[str, List[Tuple[int, Dict[str, Any]]]] = defaultdict(list)
    stats = {t.name: {"kernels_compiled": 0, "compile_s": 0.0, "wall_s": 0.0} for t in targets}
    try:
        with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(tasks))), mp_context=ctx,
                                 initializer=_worker_init, initargs=(queue,)) as pool:
            futures = {pool.submit(_worker, t.name, [c for _, c in chosen], live): (t, chosen)
                       for t, chosen in tasks}
            for future in as_completed(futures):
                t, chosen = futures[future]
                try:
                    rows, compiled, compile_s, wall = future.result()
                except Exception as e:  # noqa: BLE001 - a crashed worker fails its cases, not the run
                    rows = group_rows([
                        {"op": op, "shape": format_shape(op, spec), "dtype": SHORT_DTYPE.get(spec.get("dtype")),
                         "arch": t.name, "vendor": t.vendor, "live": False, "kernel": "(worker)", "config": "",
                         "kind": "", "case": format_case(op, spec), "hash": None, "verdict": "compile",
                         "failed": ["compile"], "error": one_line(e)} for _, (op, spec) in chosen])
                    compiled, compile_s, wall = 0, 0.0, 0.0
                first = chosen[0][0]
                done[t.name].extend((first, r) for r in rows)
                stats[t.name]["kernels_compiled"] += compiled
                stats[t.name]["compile_s"] = round(stats[t.name]["compile_s"] + compile_s, 2)
                stats[t.name]["wall_s"] = round(stats[t.name]["wall_s"] + wall, 2)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
        queue.put(None)
        reader.join(timeout=5)
        if bar is not None:
            bar.close()
    # per target in the order given, its ops in case order (sorted() is stable within a task)
    rows = [r for t in targets for _, r in sorted(done[t.name], key=lambda ir: ir[0])]
    return rows, stats
