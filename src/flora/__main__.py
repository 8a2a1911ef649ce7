"""``python -m flora``: the command line (see :mod:`flora.cli`)."""

import sys

from flora.cli import main

sys.exit(main())
