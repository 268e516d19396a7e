"""Stop training cleanly on SIGTERM or SIGINT and save a checkpoint the run resumes from (``ckpt_path=``).

What Lightning 2.6 does on its own, and why that is not enough:

* SIGTERM (what SLURM and Kubernetes send before a kill): its signal connector sets ``trainer.received_sigterm``,
  the loop raises ``SIGTERMException`` (a ``SystemExit`` with code None) after the current batch, callbacks get
  ``on_exception``, and the process exits 0 with one INFO line. Nothing is saved since the last validation.
* SIGINT (Ctrl+C): a ``KeyboardInterrupt`` wherever it lands (possibly inside the optimizer step, leaving the
  weights half-updated), then ``sys.exit(1)``. Nothing is saved.
* Its ``OnExceptionCheckpoint`` saves on *every* exception (bugs included) and deletes its file when a run ends
  normally, so it cannot write ``last.ckpt``.

:class:`InterruptCheckpoint` keeps Lightning's SIGTERM machinery and adds the saving:

* SIGTERM: in ``on_exception`` for Lightning's ``SIGTERMException`` (raised at a batch boundary, so weights, optimizer,
  EMA and step agree), ``trainer.save_checkpoint(<checkpoints>/last.ckpt)``: the trainer's checkpoint IO, which is
  :class:`~refiner.lit.checkpoint_io.AtomicCheckpointIO` in ``train.py`` (written beside, then renamed).
* SIGINT: a handler (installed for the fit, the previous one restored after) that asks the loop to stop at the end of
  the current batch (``trainer.should_stop``, Lightning's public stop request), then saves the same way in
  ``on_train_end``. A second Ctrl+C raises ``KeyboardInterrupt`` at once (nothing saved).
* Under SLURM with Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the default when
  ``SLURM_JOB_ID`` is set) a SIGTERM is left to Lightning: its SIGUSR1 handler has saved ``hpc_ckpt_<n>.ckpt`` and
  requeued the job, and the requeued job resumes from that file by itself. No handler of Lightning's is replaced
  (this callback never touches SIGTERM or SIGUSR1).

``signal`` and ``path`` tell the app what happened; ``train.py`` prints the resume command and exits 128 + signal
(143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

LAST = "last.ckpt"


def defers_to_slurm_requeue(trainer: pl.Trainer) -> bool:
    """True when Lightning's SLURM auto-requeue handles SIGTERM (and SIGUSR1) for this run."""
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and bool(environment.auto_requeue)


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where the run's checkpoints go: the ``ModelCheckpoint``'s folder, else ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    return Path(folder) if folder else Path(trainer.default_root_dir) / "checkpoints"


class InterruptCheckpoint(pl.Callback):
    """On SIGTERM or SIGINT, save ``last.ckpt`` at the end of the current batch (see the module docstring)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None  # the signal that stopped training
        self.path: Path | None = None  # the checkpoint saved for it
        self.step: int | None = None  # its global step
        self._previous_sigint: Any = None

    # ------------------------------------------------------------------------------------------ SIGINT
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint_handler(trainer))

    def _sigint_handler(self, trainer: pl.Trainer):
        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None:  # a second Ctrl+C: stop now, unsaved
                raise KeyboardInterrupt
            self.signal = signal.SIGINT
            trainer.should_stop = True

        return handler

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        if self.signal == signal.SIGINT:
            self._save(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------------------------------ SIGTERM
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, SIGTERMException) and not defers_to_slurm_requeue(trainer):
            self.signal = signal.SIGTERM
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        path = checkpoint_dir(trainer) / LAST
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            # recorded in the checkpoint, so that the resumed run's ModelCheckpoint keeps writing last.ckpt
            # (it versions to last-v1.ckpt a last.ckpt it does not know as its own)
            callback.last_model_path = str(path)
        trainer.save_checkpoint(path)  # every rank calls it; the strategy writes on rank 0
        self.path, self.step = path, trainer.global_step
