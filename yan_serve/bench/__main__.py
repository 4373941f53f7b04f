"""`python -m yan_serve.bench <command> ...`: the benchmarks' command line (`main`)."""

import sys

from yan_serve.bench import main

if __name__ == "__main__":
    sys.exit(main())
