"""Benchmarks of the ``fused`` ops and of the method end to end (PERFORMANCE.md).

``python -m benchmarks run [--quick] [--ops ...] [--regimes paper,large] [--out DIR]`` writes
``results.json`` / ``results.csv``; ``python -m benchmarks plot [--in DIR]`` draws PNGs from them.
See benchmarks/README.md for the columns and the roofline formulas.
"""
