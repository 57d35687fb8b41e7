"""``python -m catdog``: the ``catdog`` command without installing its console script."""

import sys

from catdog.cli import main

if __name__ == "__main__":
    sys.exit(main())
