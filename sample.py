"""Refine artifact images with window experts: `python sample.py inputs=<folder|glob|list> [overrides]`.

`mode=evaluate` degrades clean inputs through VQ-f8 first and writes metrics.json. See conf/sample.yaml.
Exit codes (refiner.cli): 0 all images refined (or already done); 1 some images failed (listed in
summary.json and on stderr); 2 nothing processed because of a setting, checkpoint, input or output-folder
problem (one `error:` line on stderr).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from refiner.apps.sample import task

    task(cfg)


if __name__ == "__main__":
    main()
