import sys

from udpmux.cli import main

sys.exit(main())
