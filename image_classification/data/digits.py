"""``python -m image_classification.data.digits``: the command of :mod:`image_classification.data.prepare.digits`."""
import sys

from image_classification.data.prepare.digits import build_parser, main  # noqa: F401 (build_parser: tests/test_docs.py)

if __name__ == "__main__":
    sys.exit(main())
