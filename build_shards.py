"""Build training/validation shards from image folders: `python build_shards.py [overrides]`.

Exit codes (refiner.cli): 0 every image was sharded; 1 some images could not be read (listed in each split's
manifest.json and on stderr) or a split had no readable image; 2 a setting, first-stage checkpoint or folder
that cannot work (one `error:` line on stderr, before any split is written).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="build_shards")
def main(cfg: DictConfig) -> None:
    from refiner.cli import run_cli
    from refiner.prepare import exit_code, run

    raise SystemExit(run_cli(lambda: exit_code(run(cfg))))


if __name__ == "__main__":
    main()
