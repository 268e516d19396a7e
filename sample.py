"""Deprecated name of refine.py: `python sample.py ...` runs `python refine.py ...` after one deprecation line."""

import sys

from refiner.apps.refine import main

if __name__ == "__main__":
    print("deprecated: sample.py is now refine.py (same settings); run `python refine.py ...`", file=sys.stderr)
    main()
