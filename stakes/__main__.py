"""``python -m stakes`` is the ``stakes`` command."""

import sys

from stakes.cli import main

sys.exit(main())
