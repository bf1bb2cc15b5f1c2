"""`python -m udpmux`: the same as the udpmux command."""

import sys

from udpmux.cli import main

sys.exit(main())
