"""Bodies of the commands: the Hydra ones (``train.py``, ``refine.py``, ``build_shards.py`` at the repo root, and the
installed console scripts ``refiner-train``, ``refiner refine``, ``refiner-build-shards``) and the argparse
``refiner export`` / ``refiner inspect`` (:mod:`refiner.apps.export`; ``refiner-checkpoint`` is their deprecated alias).

The configs live in the repo's ``conf/``; ``refiner/conf`` points there (a symlink in a checkout, real
files in a built wheel), so an installed package finds them without the checkout.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
