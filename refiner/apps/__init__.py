"""Bodies of the Hydra commands (``train.py``, ``sample.py``, ``build_shards.py`` at the repo root, and the
installed console scripts ``refiner-train``, ``refiner-sample``, ``refiner-build-shards``).

The configs live in the repo's ``conf/``; ``refiner/conf`` points there (a symlink in a checkout, real
files in a built wheel), so an installed package finds them without the checkout.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
