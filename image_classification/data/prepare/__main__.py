"""``python -m image_classification.data.prepare``: see :mod:`image_classification.data.prepare.cli`."""
import sys

from image_classification.data.prepare.cli import main

sys.exit(main())
