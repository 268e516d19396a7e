"""Build training/validation shards from image folders: `python build_shards.py [overrides]`."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="build_shards")
def main(cfg: DictConfig) -> None:
    from refiner.apps.build_shards import task

    task(cfg)


if __name__ == "__main__":
    main()
