#!/usr/bin/env python
"""Train or evaluate an image classifier. See README.md or ``python main.py --help``."""
import sys

from image_classification.cli import main

if __name__ == "__main__":
    sys.exit(main())
