"""`python -m clipdex …`, the same as the `clipdex` command."""

import sys

from clipdex.main import main

sys.exit(main())
