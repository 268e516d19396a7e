"""Train a window refiner or a first-stage autoencoder: `python train.py experiment=<name> [overrides]`.

Exit codes (refiner.cli): 0 trained; 2 a setting, checkpoint or data path that cannot work (one `error:`
line on stderr, before any compute where possible).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from refiner.apps.train import task

    task(cfg)


if __name__ == "__main__":
    main()
