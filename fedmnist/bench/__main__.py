"""`python -m fedmnist.bench`: the same as `fedmnist bench`."""

import sys

from fedmnist.bench.main import main

if __name__ == "__main__":
    sys.exit(main())
