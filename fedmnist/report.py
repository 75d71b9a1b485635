"""`python -m fedmnist.report`, as documented; the command lives in `fedmnist.outputs.report`."""

import sys

from fedmnist.outputs.report import main

if __name__ == "__main__":
    sys.exit(main())
