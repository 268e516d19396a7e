"""Where Hydra may put its run folder (``hydra.run.dir``: ``.hydra/`` and ``<task>.log``) when the one configured
cannot be written.

The default run dir is ``outputs/<task>/<time>`` under the working directory, which need not be writable (a
read-only checkout, a cluster's shared folder). Hydra creates it before the task starts and fails with a
``PermissionError`` traceback, even when the folder the user asked the results in is writable. Here, before Hydra
runs: if the run dir cannot be created and the command's output folder (``output_dir``, or ``paths.output_dir`` for
``train``) is given and writable, Hydra's files go there (one ``note:`` line says so); otherwise one
``error: permission denied: <run dir>`` line, exit 2. Checked by creating (and removing) a probe folder in the
nearest existing ancestor: ``os.access`` answers for the real uid, which is wrong under dropped capabilities.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from hydra.core.utils import setup_globals
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from refiner.errors import SettingError

# Hydra flags after which no job runs (and no run dir is made)
NO_RUN_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i"}


def unwritable_reason(folder: Path) -> str | None:
    """None if ``folder`` exists and is writable or can be created, else why not ("permission denied", ...)."""
    ancestor = folder.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".refiner-probe-", dir=ancestor))
    except PermissionError:
        return "permission denied"
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def _select(cfg: DictConfig, key: str) -> str | None:
    """``key`` resolved, or None if it is unset or depends on what is only known once Hydra runs
    (``${hydra:runtime.output_dir}``: the output folder *is* the run dir)."""
    try:
        value = OmegaConf.select(cfg, key)
    except (OmegaConfBaseException, ValueError):
        return None
    return None if value is None else str(value)


def run_dir_overrides(cfg: DictConfig, output_key: str | None) -> list[str]:
    """The ``hydra.run.dir=...`` override to add (``[]`` when the configured run dir is writable) for the composed
    ``cfg`` (with its ``hydra`` node); raise :class:`SettingError` when neither it nor the output folder is."""
    setup_globals()  # the ${now:...} resolver of the default run dir
    configured = _select(cfg, "hydra.run.dir")
    if configured is None:
        return []
    run_dir = Path(configured)
    if run_dir.is_dir() and _select(cfg, "hydra.output_subdir") is None:
        return []  # Hydra only checks that it exists (``refiner chain``: run dir ".", no .hydra/, logs to stdout)
    reason = unwritable_reason(run_dir)
    if reason is None:
        return []
    output = _select(cfg, output_key) if output_key else None
    if output is not None and unwritable_reason(Path(output)) is None:
        print(f"note: Hydra's run dir {run_dir.absolute()} cannot be created ({reason}); Hydra's files (.hydra/, "
              f"the log) go to {output_key}={output}", file=sys.stderr)
        return [f"hydra.run.dir={Path(output).absolute()}"]
    prefix = "permission denied: " if reason == "permission denied" else f"cannot create {run_dir.absolute()}: "
    path = run_dir.absolute() if reason == "permission denied" else reason
    where = f"{output_key}={output} is not writable either" if output is not None else (
        f"give a writable {output_key}=<folder> or hydra.run.dir=<folder>" if output_key
        else "give a writable hydra.run.dir=<folder>")
    raise SettingError(f"{prefix}{path} (Hydra's run dir; {where})")
