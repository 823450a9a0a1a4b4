"""`python -m xpert_cli`: the `xpert` command without its console script."""

import sys

from xpert_cli import main

sys.exit(main())
