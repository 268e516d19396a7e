"""Build training/validation shards from image folders: ``refiner-build-shards [overrides]``."""

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR


def task(cfg: DictConfig) -> None:
    from refiner.prepare import run

    run(cfg)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="build_shards")(task)

if __name__ == "__main__":
    main()
