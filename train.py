"""Train a window refiner or a first-stage autoencoder: `python train.py experiment=<name> [overrides]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from refiner.apps.train import task

    task(cfg)


if __name__ == "__main__":
    main()
