"""Train a window refiner or a first-stage autoencoder: ``refiner-train experiment=<name> [overrides]``."""

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR


def task(cfg: DictConfig) -> None:
    from refiner.train import run

    run(cfg)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")(task)

if __name__ == "__main__":
    main()
