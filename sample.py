"""Refine artifact images with window experts: `python sample.py inputs=<folder|glob|list> [overrides]`.

`mode=evaluate` degrades clean inputs through VQ-f8 first and writes metrics.json. See conf/sample.yaml.
Exit code 1 if any image failed (after summary.json is written).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    from refiner.refine_images import run

    if run(cfg)["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
