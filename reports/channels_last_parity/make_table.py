"""Parity of channels_last as the CPU default for convolutional models (issue 24): the
``stakes compare`` grids of ``reports/work_cuts_parity/*_cuts`` (stakes' defaults then: NCHW on the
CPU) against the same commands run with channels_last (today's default), digits k = 8 and shapes
k = 16, StructGuard (``stable``) and Adv, seeds 0-4. The criteria and tables are work_cuts_parity's.

    python reports/channels_last_parity/make_table.py            # rewrite the generated part of README.md
    python reports/channels_last_parity/make_table.py --print
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "work_cuts_parity"))
import make_table as parity  # noqa: E402

load_pair = parity.pair_loader(lambda d: HERE.parent / "work_cuts_parity" / f"{d}_cuts" / "results.json",
                               lambda d: HERE / f"{d}_channels_last" / "results.json")


def render():
    return parity.render(load_pair, before="NCHW", after="channels_last", timing=parity.PROXIES_TIMING)


def main(argv):
    return parity.main(argv, text=render(), folder=HERE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
