import sys

from flora_experiments.cli import main

sys.exit(main())
