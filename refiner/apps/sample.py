"""Refine artifact images with window experts: ``refiner-sample inputs=<folder|glob|list> [overrides]``.

Exit codes follow :mod:`refiner.cli`: 0 done, 1 some inputs failed, 2 a setting that cannot work (one
``error:`` line on stderr).
"""

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR


def task(cfg: DictConfig) -> None:
    from refiner.cli import run_cli
    from refiner.refine_images import run

    raise SystemExit(run_cli(lambda: 1 if run(cfg)["failed"] else 0))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")(task)

if __name__ == "__main__":
    main()
