"""Shared fixtures: compose the Hydra config with tiny overrides; outputs go to tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# Tiny overrides that make any training config run in seconds on 2 CPU cores.
TINY_TRAINER = [
    "trainer=cpu",
    "logger=none",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=[f"paths.output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine OpenMP's second thread
    made every op ~100x slower (spin-waiting). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; the thread count is restored after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def compose_train(tmp_path):
    def _compose(*overrides: str, output_dir: Path | None = None):
        return compose_config("train", [*TINY_TRAINER, *overrides], output_dir or tmp_path / "run")

    return _compose


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny end-to-end world (demo images -> VQ-f4/f8 -> shards) of ``tests/pipeline.py``, built once."""
    from pipeline import build_world

    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def shape_window(world, tmp_path_factory) -> dict:
    """A trained demo_refiner_500_750 run (t in [250, 500), 4 steps) in the shared world."""
    return world.train_refiner("demo_refiner_500_750", tmp_path_factory.mktemp("r500_750"))
