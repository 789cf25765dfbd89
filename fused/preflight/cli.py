"""``python -m fused preflight``: the command line."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import List, Optional, Sequence

from fused._targets import DEFAULT_TARGETS, TARGETS, Target, live_target, target_of
from fused.preflight.check import interpreter_on, live_card, run
from fused.preflight.grid import default_cases
from fused.preflight.report import format_summary, format_table, summarise, write_json
from fused.preflight.specs import SpecError, parse_shape, shape_help


def parse_targets(text: str) -> List[Target]:
    """``--arch``: comma-separated targets (``120,gfx942``, ``sm_90``), each once, in table order."""
    chosen = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            chosen.append(target_of(part.strip()))  # a card outside the table gets conservative limits
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not chosen:
        raise argparse.ArgumentTypeError(f"--arch must name at least one target, got {text!r}")
    order = {t.name: i for i, t in enumerate(TARGETS)}
    unique = {t.name: t for t in chosen}
    return sorted(unique.values(), key=lambda t: order.get(t.name, len(order)))


def _targets_help() -> str:
    lines = ["Targets (--arch; default: every one marked *):"]
    for t in TARGETS:
        limit = f"{t.shared_limit:,} B {'LDS' if t.is_amd else 'shared'}"
        regs = f"{t.max_registers} {'VGPRs a lane' if t.is_amd else 'registers a thread'}"
        lines.append(f"  {'*' if t.default else ' '} {t.name:7s} {t.vendor:6s} {limit:>22s}, {regs:22s} {t.products}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused preflight", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_targets_help() + "\n" + shape_help()
        + "\nExit status: 0 when every row passes, 1 when one fails, 2 for bad arguments.",
        description="Compile every kernel at its launcher's configuration for each target (no GPU needed)\n"
                    "and check shared memory / LDS, registers, spills, matrix instructions and 128-bit accesses.",
    )
    parser.add_argument("--arch", type=parse_targets, default=list(DEFAULT_TARGETS),
                        help="comma-separated targets, e.g. 120,gfx942 or sm_90 (default: "
                             + ",".join(t.name for t in DEFAULT_TARGETS) + "); a local GPU is added")
    parser.add_argument("--shape", action="append", default=[], metavar="OP:KEY=VAL,...",
                        help="a case instead of the default grid, e.g. similarity:N=128,D=512,K=100,dtype=bf16 "
                             "or update:params=resnet50,importance=uint8,momentum=0.9 (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write every grouped row, with versions, date and targets")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    live = parser.add_mutually_exclusive_group()
    live.add_argument("--no-live", action="store_true", help="do not add the local GPU")
    live.add_argument("--only-live", action="store_true",
                      help="check the local GPU only, with its own driver (exit 2 when there is none)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cases = [parse_shape(s) for s in args.shape] if args.shape else default_cases()
    except SpecError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.jobs < 1:
        parser.exit(2, f"{parser.prog}: error: --jobs must be >= 1, got {args.jobs}\n")
    if interpreter_on():
        print("note: TRITON_INTERPRET is set here; the preflight compiles in worker processes without it",
              file=sys.stderr)
    targets = list(args.arch)
    live = None if args.no_live else live_card()
    if args.only_live:
        if live is None:
            parser.exit(2, f"{parser.prog}: error: --only-live: no GPU here (torch.cuda.is_available() is False)\n")
        targets = []
    if live is not None and live["arch"] not in [t.name for t in targets]:
        targets.append(target_of(live["arch"]))
    t0 = time.perf_counter()
    rows, stats = run(targets, cases, args.jobs, live, show_progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    summary = summarise(rows, len(cases), stats)
    summary["seconds"] = round(seconds, 1)
    print(format_table(rows))
    if live is not None:
        print(f"* live card: {live['name']} ({live['arch']}), compiled with its own driver")
    print(format_summary(summary, seconds))
    if args.json:
        import torch
        import triton

        described = []
        for t in targets:
            own = live_target(t.name, live["shared_limit"]) if live and live["arch"] == t.name else t
            described.append({k: v for k, v in asdict(own).items() if k != "default"})
        write_json(args.json, {
            "triton": triton.__version__, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            # the compiling host: a static check needs no GPU (``live`` says which card, if any, also ran)
            "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
                     "jobs": args.jobs},
            "archs": [t.name for t in targets], "targets": described, "live": live,
            "summary": summary, "rows": rows,
        })
        print(f"rows -> {args.json}")
    return 1 if summary["failing_rows"] else 0
