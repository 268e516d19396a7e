"""The composition benchmark: ``python -m refiner.bench [overrides]`` or ``refiner-bench`` (``conf/bench.yaml``).

Exit codes follow :mod:`refiner.cli`: 0 done, 2 a setting, checkpoint or output folder that cannot work
(one ``error:`` line on stderr, before any compute).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR


def task(cfg: DictConfig) -> None:
    from refiner.bench.run import run
    from refiner.cli import run_cli

    def body() -> None:
        results = run(cfg)
        print((Path(cfg.output_dir) / "results.md").read_text())
        print(f"results: {cfg.output_dir}/results.json (split {results['split']})")

    raise SystemExit(run_cli(body))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")(task)

if __name__ == "__main__":
    main()


def artifacts_task(cfg: DictConfig) -> None:
    """``python -m refiner.bench.artifacts``: detection and targeted correction (:mod:`refiner.bench.artifacts`)."""
    from refiner.bench.artifacts import run
    from refiner.cli import run_cli

    def body() -> None:
        run(cfg)
        print((Path(cfg.output_dir) / "artifacts.md").read_text())

    raise SystemExit(run_cli(body))


artifacts_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")(artifacts_task)
