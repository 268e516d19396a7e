"""Refine artifact images with window experts: ``refiner-sample inputs=<folder|glob|list> [overrides]``.

``mode=evaluate`` degrades clean inputs through VQ-f8 first and writes metrics.json. See conf/sample.yaml.
Exit codes: 0 all images refined; 1 some images failed (listed in summary.json and on stderr);
2 nothing processed because of a setting, checkpoint or input problem (message on stderr).
"""

import sys

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR


def task(cfg: DictConfig) -> None:
    from refiner.checkpoints import CheckpointError
    from refiner.refine_images import SampleError, run

    try:
        summary = run(cfg)
    except (SampleError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    if summary["failed"]:
        raise SystemExit(1)


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")(task)

if __name__ == "__main__":
    main()
