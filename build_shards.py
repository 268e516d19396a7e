"""Build training/validation shards from image folders: `python build_shards.py [overrides]`.

Exit codes (refiner.cli): 0 every image was sharded; 1 some images could not be read (listed in each split's
manifest.json and on stderr) or a split had no readable image; 2 a setting, first-stage checkpoint or folder
that cannot work (one `error:` line on stderr, before any split is written).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="build_shards")
def main(cfg: DictConfig) -> None:
    from refiner.apps.build_shards import task

    task(cfg)


if __name__ == "__main__":
    main()
