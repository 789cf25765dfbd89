"""``python -m fused.preflight`` (the same as ``python -m fused preflight``)."""

import sys

from fused.preflight.cli import main

if __name__ == "__main__":
    sys.exit(main())
