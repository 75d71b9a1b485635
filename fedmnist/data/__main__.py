"""`python -m fedmnist.data describe`: what a configured federated population looks like."""

import sys

from fedmnist.data.population import main

if __name__ == "__main__":
    sys.exit(main())
