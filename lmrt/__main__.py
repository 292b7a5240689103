"""`python -m lmrt`: the lmrt command line."""

import sys

from lmrt.cli import main

sys.exit(main())
