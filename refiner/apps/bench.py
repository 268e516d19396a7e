"""The composition benchmark: ``python -m refiner.bench [overrides]`` or ``refiner-bench`` (``conf/bench.yaml``).

Exit codes follow :mod:`refiner.cli`: 0 done, 2 a setting, checkpoint or output folder that cannot work
(one ``error:`` line on stderr, before any compute).
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from refiner.apps import CONFIG_DIR
from refiner.bench.run import run
from refiner.cli import run_cli


def task(cfg: DictConfig) -> None:

    def body() -> None:
        results = run(cfg)
        print((Path(cfg.output_dir) / "results.md").read_text())
        print(f"results: {cfg.output_dir}/results.json (split {results['split']})")

    raise SystemExit(run_cli(body))


main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")(task)

if __name__ == "__main__":
    main()


def _side_task(module: str, report: str):
    """A Hydra task over ``conf/bench.yaml`` that runs ``refiner.bench.<module>.run`` and prints its ``report``."""

    def side_task(cfg: DictConfig) -> None:
        import importlib


        def body() -> None:
            importlib.import_module(f"refiner.bench.{module}").run(cfg)
            print((Path(cfg.output_dir) / report).read_text())

        raise SystemExit(run_cli(body))

    return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")(side_task)


# python -m refiner.bench.artifacts: detection and targeted correction (refiner.bench.artifacts)
artifacts_main = _side_task("artifacts", "artifacts.md")
# python -m refiner.bench.upscale: progressive vs bicubic-then-refine upscaling (refiner.bench.upscale)
upscale_main = _side_task("upscale", "upscale.md")
