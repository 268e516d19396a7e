"""``refine.py`` / ``refiner refine``: refine artifact images through a chain of window experts,
``refiner refine inputs=<folder|glob|list> [preset=<name>] [overrides]`` (settings: ``conf/refine.yaml``; presets:
``conf/preset/``).

The app reads the Hydra config, turns it into :class:`~refiner.inference.settings.RefineSettings` once, and calls
:func:`refiner.inference.refine_run.run`, which does the work (see its docstring). Bulk: ``torchrun
--nproc_per_node=N refine.py inputs=... output_dir=...`` shards the sorted inputs by rank.

Deprecated spellings still work and print one line naming the new one: ``stages=`` (now ``experts=``),
``mode=sample`` (now ``mode=refine``), ``sample.py`` / ``refiner-sample`` (now ``refine.py`` / ``refiner refine``).

Exit codes follow :mod:`refiner.cli`: 0 done, 1 some inputs failed or a file could not be written (a full disk:
one ``error:`` line), 2 a setting that cannot work (one ``error:`` line on stderr; an output that would land on an
input included).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from refiner.apps.hydra_app import hydra_command, settings_from
from refiner.cli import run_cli
from refiner.inference import refine_run
from refiner.inference.settings import RefineSettings

ALIASES = {"stages": "experts", "mode=sample": "mode=refine"}


def settings(cfg: DictConfig) -> RefineSettings:
    """The run's typed settings (the one conversion from config)."""
    return settings_from(RefineSettings, cfg, drop=("paths", "task_name", "preset"))


def run(cfg: DictConfig) -> dict:
    """:func:`refiner.inference.refine_run.run` on this config; returns the summary."""
    return refine_run.run(settings(cfg), config_text=OmegaConf.to_yaml(cfg, resolve=True))


def exit_code(summary: dict) -> int:
    """1 if an image failed or a report (a grid, metrics.json) could not be written, else 0."""
    return 1 if summary["failed"] or summary.get("unwritten") else 0


def task(cfg: DictConfig) -> None:
    """The Hydra task: :func:`run` under :func:`refiner.cli.run_cli`'s exit-code contract."""
    raise SystemExit(run_cli(lambda: exit_code(run(cfg))))


main = hydra_command("refine", task, ALIASES)

if __name__ == "__main__":
    main()
