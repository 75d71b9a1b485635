"""`python -m fedmnist COMMAND`: the same as the `fedmnist` console script."""

import sys

from fedmnist.cli import main

sys.exit(main())
