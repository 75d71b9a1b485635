"""`python -m fedmnist.bench`: the same as `fedmnist bench`."""

import sys

from fedmnist.bench.main import main
from fedmnist.cli import use_own_temporary_directory

if __name__ == "__main__":
    use_own_temporary_directory()
    sys.exit(main())
