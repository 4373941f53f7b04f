"""`python -m yan_serve` runs the server (same as `yan-serve`)."""

import sys

from yan_serve.server.main import main

sys.exit(main())
