"""Parity of channels_last as the CPU default for convolutional models (issue 24): the
``stakes compare`` grids of ``reports/work_cuts_parity/*_cuts`` (stakes' defaults then: NCHW on the
CPU) against the same commands run with channels_last (today's default), digits k = 8 and shapes
k = 16, StructGuard (``stable``) and Adv, seeds 0-4. The criteria and tables are work_cuts_parity's.

    python reports/channels_last_parity/make_table.py            # rewrite the generated part of README.md
    python reports/channels_last_parity/make_table.py --print
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "work_cuts_parity"))
import make_table as parity  # noqa: E402

TIMING = ("shared_proxies_s", "the proxy set's seconds (PGD; shared by a seed's methods; under whatever load the "
          "grid ran)", "proxies s")


def render():
    out, verdicts = [], {}
    for dataset, k in parity.GRIDS:
        paths = {"without": HERE.parent / "work_cuts_parity" / f"{dataset}_cuts" / "results.json",
                 "cuts": HERE / f"{dataset}_channels_last" / "results.json"}
        if not all(p.is_file() for p in paths.values()):
            out += [f"### {dataset}, k = {k}", "", "(not run yet)", ""]
            continue
        payloads = {side: json.loads(p.read_text()) for side, p in paths.items()}
        lines, v = parity.grid(dataset, k, payloads, before="NCHW", after="channels_last", timing=TIMING)
        out += lines
        verdicts.update({(dataset, m): x for m, x in v.items()})
    if verdicts:
        c1, c2 = all(v[0] for v in verdicts.values()), all(v[1] for v in verdicts.values())
        out.append(f"**Verdict over the {len(verdicts)} cells:** C1 {'holds' if c1 else 'FAILS'}; C2 "
                   f"{'holds' if c2 else 'FAILS'}" + (" in every cell." if c1 and c2 else " (see the cells above)."))
    return "\n".join(out)


def main(argv):
    text = render()
    if "--print" in argv:
        print(text)
        return 0
    readme = HERE / "README.md"
    head, rest = readme.read_text().split(parity.BEGIN, 1)
    _, tail = rest.split(parity.END, 1)
    readme.write_text(f"{head}{parity.BEGIN}\n{text}\n{parity.END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
