"""`python -m fedmnist.bench`: the same as `fedmnist bench`."""

import sys

from fedmnist.bench.main import main
from fedmnist.cli import own_temporary_directory

if __name__ == "__main__":
    with own_temporary_directory():
        code = main()
    sys.exit(code)
