"""`python -m medsft.cli <command>`: what the `medsft` script runs (the distributed relaunch uses it too)."""

import sys

from medsft.cli import main

sys.exit(main())
