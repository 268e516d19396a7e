"""The quality benchmark's commands over ``conf/bench.yaml``: ``refiner bench`` (``python -m refiner.bench``),
``refiner bench-artifacts``, ``refiner bench-upscale`` and ``refiner bench-asced`` (also ``python -m refiner <command>``), each with Hydra
overrides.

This is the one place the benchmark's Hydra config is read: :func:`bench_settings` turns the composed config into
:class:`~refiner.bench.settings.BenchSettings` once (:func:`refiner.apps.hydra_app.settings_from`; an unknown key, a
bad value or an interpolation that does not resolve is one line), and the commands hand those to
:mod:`refiner.bench`. Exit codes follow :mod:`refiner.cli`: 0 done, 2 a setting, checkpoint or output folder that
cannot work (one ``error:`` line on stderr, before any model loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from refiner.apps.hydra_app import hydra_command, settings_from
from refiner.bench import artifacts, asced, run, upscale
from refiner.bench.settings import BenchSettings
from refiner.cli import run_cli
from refiner.errors import SettingError


def bench_settings(cfg: DictConfig) -> BenchSettings:
    """The composed ``conf/bench.yaml`` as typed settings, checked."""
    try:
        return settings_from(BenchSettings, cfg)
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise SettingError(f"conf/bench.yaml: {err}") from err


def _task(command: Callable[[BenchSettings], dict], report: str | Callable[[BenchSettings], str],
          summary: Callable[[BenchSettings, dict], str] | None) -> Callable[[DictConfig], None]:
    """A Hydra task over ``conf/bench.yaml``: settings, then ``command``, then its ``report`` (a file in
    ``output_dir``, or a function of the settings naming it) printed, and ``summary``'s line."""

    def task(cfg: DictConfig) -> None:

        def body() -> None:
            settings = bench_settings(cfg)
            results = command(settings)
            name = report(settings) if callable(report) else report
            print((Path(settings.output_dir) / name).read_text())
            if summary is not None:
                print(summary(settings, results))

        raise SystemExit(run_cli(body))

    return task


task = _task(run.run, "results.md",
             lambda settings, results: f"results: {settings.output_dir}/results.json (split {results['split']})")
# refiner bench-artifacts: detection and targeted correction (refiner.bench.artifacts)
artifacts_task = _task(artifacts.run, "artifacts.md", None)
# refiner bench-upscale: progressive vs bicubic-then-refine upscaling (refiner.bench.upscale)
# (with upscale.target_sizes: beyond the training size, refiner.bench.upscale_targets)
upscale_task = _task(upscale.run, lambda s: "upscale_targets.md" if s.upscale.target_sizes else "upscale.md", None)
# refiner bench-asced: ASCED at its own operating point (refiner.bench.asced)
asced_task = _task(asced.run, "asced.md", None)
main, artifacts_main, upscale_main, asced_main = (hydra_command("bench", t)
                                                  for t in (task, artifacts_task, upscale_task, asced_task))

if __name__ == "__main__":
    main()
