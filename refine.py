"""Refine artifact images through a chain of window experts: `python refine.py inputs=<folder|glob|list> [overrides]`
(the same as `refiner refine ...`; body in refiner/apps/refine.py, settings in conf/refine.yaml).

`mode=evaluate` degrades clean inputs through VQ-f8 first and writes metrics.json. Exit codes (refiner.cli):
0 all images refined (or already done); 1 some images failed (listed in summary.json and on stderr); 2 nothing
processed because of a setting, checkpoint, input or output-folder problem (one `error:` line on stderr).
"""

from refiner.apps.refine import main

if __name__ == "__main__":
    main()
