"""``python -m image_classification.data.digits``: the command of :mod:`image_classification.data.prepare.digits`."""
import sys

from image_classification.data.prepare.digits import main

if __name__ == "__main__":
    sys.exit(main())
