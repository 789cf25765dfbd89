"""Command line: ``python -m benchmarks run [...]``, ``python -m benchmarks plot [...]`` and
``python -m benchmarks whole-run [...]``.

Run from the repository root (``benchmarks`` is not an installed package).

Exit status of ``run``: 0 when no row is an error, 1 when any row is (each failed row is named on
stderr); of ``whole-run``: 1 when a recipe failed or the two did different work; 2 for bad
arguments, an ``--out`` that cannot be a folder among them (checked before any work).

Results go to ``--out``, else ``$STAKES_CACHE/benchmarks/<device>/`` (``~/.cache/stakes/...``):
never into the source tree unless named (``--out benchmarks/results/<device>``).
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.ops import OPS, PROVIDERS, REGIMES

_DEFAULT_OUT = "$STAKES_CACHE/benchmarks/<device>/, else ~/.cache/stakes/benchmarks/<device>/"


def _csv_list(allowed):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _writable_folder_problem(path: str):
    """Why ``path`` cannot be the output folder (None when it can): an existing file, a path under a
    file, or a folder (or its nearest existing parent) this process cannot write to. Nothing is created."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{path} exists and is not a folder"
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is a file, so {path} cannot be a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def _check_out(parser, flag: str, path: str) -> None:
    """Exit 2 with one line naming ``flag`` when ``path`` cannot hold the output: before any work."""
    why = _writable_folder_problem(path)
    if why:
        parser.error(f"{flag} {path}: {why}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="time the ops (and the end-to-end runs); write results.json/.csv")
    run_p.add_argument("--quick", action="store_true", help="small CPU-friendly sizes; compile only for each op's first case")
    run_p.add_argument("--ops", type=_csv_list(OPS), default=list(OPS), help=f"subset of {','.join(OPS)}")
    run_p.add_argument("--regimes", type=_csv_list(REGIMES), default=list(REGIMES), help="paper,large")
    run_p.add_argument("--providers", type=_csv_list(PROVIDERS), default=None,
                       help=f"subset of {','.join(PROVIDERS)} (default: all that apply)")
    run_p.add_argument("--no-e2e", action="store_true", help="skip proxy generation and StructGuard steps/s")
    run_p.add_argument("--max-minutes", type=float, default=None,
                       help="time budget of the op cases, counted from after the end-to-end rows: no case starts "
                            "once it is spent (results so far are kept)")
    run_p.add_argument("--deadline-minutes", type=float, default=None,
                       help="time limit of the whole run, end-to-end rows included: no op case starts after it")
    run_p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice). On a shared CPU, 1 avoids the "
                            "OpenMP oversubscription that makes multi-threaded timings meaningless")
    run_p.add_argument("--out", default=None,
                       help=f"output folder (default {_DEFAULT_OUT}, outside the source tree; the committed "
                            "results are written only when named: --out benchmarks/results/<device>)")
    run_p.add_argument("--plot", action="store_true", help="draw the plots into the output folder afterwards")

    plot_p = sub.add_parser("plot", help="draw PNGs from results.json")
    plot_p.add_argument("--in", dest="in_dir", default=None,
                        help=f"folder with results.json (default {_DEFAULT_OUT}: where `run` writes by default)")
    plot_p.add_argument("--out", default=None, help="folder for the PNGs (default: the input folder)")

    whole = sub.add_parser("whole-run", help="the authors' script as it runs vs stakes' defaults, per phase; write "
                                             "whole_run.json/.csv")
    whole.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    whole.add_argument("--size", choices=("full", "representative", "quick"), default=None,
                       help="full (the default: the issue's size, k=256, R=20, 100 PGD steps, N_tot = |D_r| = "
                            "49,744, 3 epochs, the 10,000-image test set); representative (a CPU size whose phase "
                            "shares match the full run's: k=8, R=20, 100 PGD steps, N_tot and the test set scaled "
                            "with N_s); quick (a reduced smoke size)")
    whole.add_argument("--quick", action="store_true", help="the same as --size quick")
    for name, what in (("k", "forget images"), ("repetitions", "R"), ("pgd-steps", "PGD steps a proxy"),
                       ("steps", "optimisation steps (default: the size's number of epochs)"),
                       ("importance-samples", "N_tot (default with --k: 50,000 - k)"),
                       ("test-size", "test images of the final evaluation"),
                       ("retain-size", "D_r images of the final evaluation (default: N_tot)")):
        whole.add_argument(f"--{name}", type=_positive_int, default=None, help=what)
    whole.add_argument("--networks", type=_csv_list(("authors", "resnet18")), default=None,
                       help="rows, the first the headline: authors (their CIFAR-10 ResNet-18, max-pool stem), "
                            "resnet18 (stakes' own, no max-pool). Default: authors,resnet18 at the full size, "
                            "authors otherwise")
    whole.add_argument("--recipes", type=_csv_list(("authors", "stakes")), default=None,
                       help="run only these recipes (default both; one recipe gives no ratio)")
    whole.add_argument("--kernels-only", action="store_true",
                       help="every tensor resident on the device for both recipes: no DataLoader, no PIL/ToTensor, "
                            "no host copies (the default runs the authors' data path as theirs)")
    whole.add_argument("--launch-blocking-row", action="store_true",
                       help="on a card, also run the authors' recipe in a child process under CUDA_LAUNCH_BLOCKING=1 "
                            "(their published command's setting): a row shown, never a headline")
    whole.add_argument("--seed", type=int, default=0)
    whole.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    whole.add_argument("--no-warmup", action="store_true", help="skip the tiny warm-up run of each recipe")
    whole.add_argument("--repeats", type=_positive_int, default=1,
                       help="run both recipes this many times, interleaved (authors, stakes, authors, ...), and keep "
                            "each phase's fastest time and the fastest whole (for a shared CPU: contention only "
                            "slows a run down; every run is kept in the JSON)")
    whole.add_argument("--out", default=None, help=f"output folder (default {_DEFAULT_OUT}, outside the source tree)")

    args = parser.parse_args(argv)
    if args.out is not None:   # every subcommand has --out: checked before any work
        _check_out(parser, "--out", args.out)
    if args.command == "whole-run":
        import torch

        from benchmarks import whole_run
        from benchmarks.run import default_out_dir

        if args.out is None:
            try:
                args.out = default_out_dir(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
            except (RuntimeError, AssertionError, ValueError) as exc:   # a device string torch refuses
                parser.error(f"--device {args.device}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
            _check_out(parser, "--out (default)", args.out)
        return whole_run.main(args)
    if args.command == "run":
        if args.threads is not None:
            import torch

            if args.threads < 1:
                parser.error(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        for name in ("max_minutes", "deadline_minutes"):
            value = getattr(args, name)
            if value is not None and not value > 0:
                parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
        from benchmarks.report import read_results
        from benchmarks.run import default_out_dir, is_error, run, tally

        if args.out is None:
            import torch

            args.out = default_out_dir(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            _check_out(parser, "--out (default)", args.out)

        out = run(args.ops, args.regimes, args.out, quick=args.quick, providers=args.providers,
                  e2e=not args.no_e2e, max_minutes=args.max_minutes, deadline_minutes=args.deadline_minutes)
        if args.plot:
            from benchmarks.plot import plot

            for path in plot(out):
                print(f"wrote {path}")
        _, rows = read_results(out)  # what was written is what counts
        failed = [r for r in rows if is_error(r)]
        if failed:
            print(f"python -m benchmarks run: {len(failed)} of {len(rows)} rows failed ({tally(rows)}):",
                  file=sys.stderr)
            for r in failed:
                what = " ".join(str(r.get(k)) for k in ("op", "regime", "shape", "dtype", "provider", "pass")
                                if r.get(k) is not None)
                print(f"  {what}: {r.get('status')}", file=sys.stderr)
            return 1
        return 0
    from benchmarks.plot import plot

    in_dir = args.in_dir
    if in_dir is None:
        import torch

        from benchmarks.run import default_out_dir

        in_dir = default_out_dir(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        paths = plot(in_dir, args.out)
    except FileNotFoundError as exc:   # no results.json there: one line naming the folder
        parser.error(f"--in {in_dir}: {exc}")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
