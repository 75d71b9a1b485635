"""`python -m fedmnist.worker`, as documented; the command lives in `fedmnist.runtime.worker`."""

import sys

from fedmnist.runtime.worker import main

if __name__ == "__main__":
    sys.exit(main())
