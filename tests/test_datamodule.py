import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from refiner.lit.datamodule import DeterministicBatches, LatentDataModule, epoch_permutation


def _tensor_bytes(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def _png(h, w, value):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, n: int, per_shard: int, sizes=None) -> Path:
    """Sample i: z_clean filled with i, z_degraded with -i, clean/degraded PNGs of 4x the latent size."""
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(n):
            h, wd = sizes[i] if sizes else (2, 2)
            w.write({"__key__": f"{i:06d}", "z_clean.pth": _tensor_bytes(torch.full((3, h, wd), float(i))),
                     "z_degraded.pth": _tensor_bytes(torch.full((3, h, wd), -float(i))),
                     "clean.png": _png(4 * h, 4 * wd, 255), "degraded.png": _png(4 * h, 4 * wd, 0)})
    return root


def fake_trainer(world_size=1, rank=0, global_step=0, accumulate=1):
    return SimpleNamespace(world_size=world_size, global_rank=rank, global_step=global_step,
                           accumulate_grad_batches=accumulate)


def ids(batch):
    return batch["z_clean"][:, 0, 0, 0].long().tolist()


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def make_dm(shards, trainer=None, **kw):
    dm = LatentDataModule(train_shards=str(shards), **kw)
    dm.trainer = trainer
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- deterministic


def test_batches_follow_the_formula_and_are_pure(tmp_path):
    shards = write_shards(tmp_path / "s", n=10, per_shard=4)
    dm = make_dm(shards, batch_size=3, seed=7, trainer=fake_trainer(world_size=2, rank=1))
    got = [ids(b) for b in take(dm.train_dataloader(), 5)]
    # hand-evaluated formula: p = (s*W + r)*B + j, index = perm(seed, p // N)[p % N]
    expected = []
    for s in range(5):
        ps = [(s * 2 + 1) * 3 + j for j in range(3)]
        expected.append([int(epoch_permutation(7, p // 10, 10)[p % 10]) for p in ps])
    assert got == expected
    # the latents really are the sample's: z_clean = i, z_degraded = -i
    b = take(dm.train_dataloader(), 1)[0]
    assert torch.equal(b["z_degraded"], -b["z_clean"]) and b["z_clean"].shape == (3, 3, 2, 2)
    assert b["z_clean"].dtype == torch.float32 and torch.equal(b["index"], b["z_clean"][:, 0, 0, 0].long())
    # a fresh module (a new process, say) gives the same stream; another seed does not
    assert [ids(x) for x in take(make_dm(shards, batch_size=3, seed=7, trainer=fake_trainer(2, 1)).train_dataloader(), 5)] == got
    assert [ids(x) for x in take(make_dm(shards, batch_size=3, seed=8, trainer=fake_trainer(2, 1)).train_dataloader(), 5)] != got
    assert not torch.equal(epoch_permutation(7, 0, 10), epoch_permutation(7, 1, 10))


def test_resume_from_step_matches_continuing(tmp_path):
    shards = write_shards(tmp_path / "s", n=7, per_shard=7)
    full = [ids(b) for b in take(make_dm(shards, batch_size=2, trainer=fake_trainer()).train_dataloader(), 12)]
    # from the trainer: global_step 3 with accumulate 2 -> micro-step 6
    resumed = make_dm(shards, batch_size=2, trainer=fake_trainer(global_step=3, accumulate=2))
    assert resumed.resume_step() == 6
    assert [ids(b) for b in take(resumed.train_dataloader(), 6)] == full[6:]
    explicit = make_dm(shards, batch_size=2, start_step=9, trainer=fake_trainer(global_step=3))
    assert [ids(b) for b in take(explicit.train_dataloader(), 3)] == full[9:]


def test_two_ranks_disjoint_and_cover_each_epoch(tmp_path):
    n, b, w = 12, 2, 2
    shards = write_shards(tmp_path / "s", n=n, per_shard=5)
    streams = [
        [ids(x) for x in take(make_dm(shards, batch_size=b, seed=3, trainer=fake_trainer(w, r)).train_dataloader(), 6)]
        for r in range(w)
    ]
    steps_per_epoch = n // (b * w)  # 3
    for epoch in range(2):
        sl = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        r0 = [i for batch in streams[0][sl] for i in batch]
        r1 = [i for batch in streams[1][sl] for i in batch]
        assert set(r0).isdisjoint(r1) and sorted(r0 + r1) == list(range(n))
    assert streams[0][:3] != streams[0][3:]  # a new permutation each epoch


def test_workers_preserve_order(tmp_path):
    shards = write_shards(tmp_path / "s", n=9, per_shard=9)
    single = [ids(b) for b in take(make_dm(shards, batch_size=2, trainer=fake_trainer()).train_dataloader(), 7)]
    multi = make_dm(shards, batch_size=2, num_workers=2, start_step=0)
    assert [ids(b) for b in take(multi.train_dataloader(), 7)] == single


def test_deterministic_batches_validation():
    t = {"z_clean": torch.zeros(4, 3, 2, 2), "z_degraded": torch.zeros(4, 3, 2, 2)}
    with pytest.raises(ValueError):
        DeterministicBatches(t, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        DeterministicBatches({"z_clean": torch.zeros(4, 1), "z_degraded": torch.zeros(3, 1)}, batch_size=2)


def test_setup_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*build the shards"):
        make_dm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no .tar shards"):
        make_dm(tmp_path / "empty")
    mixed = write_shards(tmp_path / "mixed", n=3, per_shard=3, sizes=[(2, 2), (2, 2), (2, 3)])
    with pytest.raises(ValueError, match="different shapes.*size="):
        make_dm(mixed)
    with pytest.raises(ValueError, match="mode"):
        LatentDataModule(train_shards="x", mode="random")


# ---------------------------------------------------------------------------------------------- validation


def test_val_batches_have_images_and_are_bucketed_by_shape(tmp_path):
    train = write_shards(tmp_path / "t", n=4, per_shard=4)
    val = write_shards(tmp_path / "v", n=5, per_shard=2, sizes=[(2, 2), (2, 2), (2, 2), (2, 4), (2, 4)])
    dm = LatentDataModule(train_shards=str(train), val_shards=str(val), batch_size=2, val_max_samples=4)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [ids(b) for b in batches] == [[0, 1], [2], [3]]  # shape change splits; capped at 4 samples
    b = batches[0]
    assert b["clean"].shape == (2, 3, 8, 8) and float(b["clean"].min()) == 1.0 and float(b["degraded"].max()) == -1.0
    assert b["z_clean"].shape == (2, 3, 2, 2) and b["__key__"] == ["000000", "000001"]
    assert [ids(x) for x in dm.val_dataloader()] == [[0, 1], [2], [3]]  # finite and repeatable
    no_val = make_dm(train)
    assert no_val.val_dataloader() == []


# ---------------------------------------------------------------------------------------------- stream


def test_stream_mode_splits_by_rank_and_needs_enough_shards(tmp_path):
    shards = write_shards(tmp_path / "s", n=8, per_shard=2)  # 4 shards
    seen = []
    for rank in range(2):
        dm = make_dm(shards, mode="stream", batch_size=2, shuffle_buffer=3, epoch_length=6,
                     trainer=fake_trainer(world_size=2, rank=rank))
        batches = list(dm.train_dataloader())
        assert len(batches) == 3 and all(b["z_clean"].shape == (2, 3, 2, 2) for b in batches)  # with_epoch
        assert all(torch.equal(b["z_degraded"], -b["z_clean"]) for b in batches)
        seen.append({i for b in batches for i in ids(b)})
    # resampled shards: each rank draws from its own half of the shard list (split by node)
    shard_of = lambda i: i // 2  # noqa: E731
    assert {shard_of(i) for i in seen[0]}.isdisjoint({shard_of(i) for i in seen[1]})

    with pytest.raises(ValueError, match=r"4 shard\(s\) for 2 rank\(s\) x 4 dataloader worker\(s\)"):
        make_dm(shards, mode="stream", num_workers=4, trainer=fake_trainer(world_size=2))


def test_stream_mode_with_workers(tmp_path):
    shards = write_shards(tmp_path / "s", n=8, per_shard=2)
    dm = make_dm(shards, mode="stream", batch_size=2, num_workers=2, epoch_length=8, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and {i for b in batches for i in ids(b)} <= set(range(8))


# ---------------------------------------------------------------------------------------------- Lightning resume


class _Recorder(__import__("pytorch_lightning").LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["index"].tolist())
        return (self.w * batch["z_clean"].mean()).sum() + self.w.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_real_trainer_resume_continues_the_stream(tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    shards = write_shards(tmp_path / "s", n=5, per_shard=5)
    common = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  accumulate_grad_batches=2, limit_val_batches=0, max_steps=4)
    full = _Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    pl.Trainer(default_root_dir=tmp_path, callbacks=[ckpt], **common).fit(
        full, datamodule=LatentDataModule(train_shards=str(shards), batch_size=2))
    assert len(full.seen) == 8  # 4 optimizer steps x 2 micro-batches

    resumed = _Recorder()
    pl.Trainer(default_root_dir=tmp_path, **common).fit(
        resumed, datamodule=LatentDataModule(train_shards=str(shards), batch_size=2),
        ckpt_path=str(tmp_path / "ck" / "step=2.ckpt"))
    assert resumed.seen == full.seen[4:]


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import pytorch_lightning as pl
sys.path.insert(0, {tests!r})
from test_datamodule import _Recorder
from refiner.lit.datamodule import LatentDataModule

class R(_Recorder):
    def on_train_end(self):
        Path({out!r}, f"seen{{self.global_rank}}.json").write_text(json.dumps(self.seen))

if __name__ == "__main__":
    pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False).fit(
        R(), datamodule=LatentDataModule(train_shards={shards!r}, batch_size=2, seed=5))
"""


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_batches_from_the_trainer(tmp_path):
    import json
    import os
    import subprocess
    import sys

    shards = write_shards(tmp_path / "s", n=8, per_shard=8)
    script = tmp_path / "run_ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path), shards=str(shards)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{rank}.json").read_text()) for rank in range(2)]
    for rank in range(2):  # rank/world size came from the trainer: same as the formula's stream
        expected = DeterministicBatches(
            {"z_clean": torch.zeros(8, 1), "z_degraded": torch.zeros(8, 1)}, 2, seed=5, rank=rank, world_size=2
        )
        assert seen[rank] == [expected.indices(s).tolist() for s in range(4)]
    epoch0 = [i for rank in range(2) for b in seen[rank][:2] for i in b]
    assert sorted(epoch0) == list(range(8))
