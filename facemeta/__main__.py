"""`python -m facemeta` runs the command line."""

import sys

from facemeta.cli import main

sys.exit(main())
