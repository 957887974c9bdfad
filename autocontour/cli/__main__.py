"""`python -m autocontour.cli`: the same as the `autocontour` command."""

import sys

from autocontour.cli import main

sys.exit(main())
