"""Row 6: LatentDataModule loader throughput (both modes) vs the training step's consumption rate.

Shards: 64 crops of the demo photos, 64 px, built by ``build_shards`` with untrained demo VQ models,
16 samples per shard. Loader: ``LatentDataModule(batch_size=16, num_workers=0).train_dataloader()``
iterated alone (batches/s; stream mode includes tar reading and ``torch.load`` of every latent).
Consumer: the demo UNet training step (fwd+bwd+AdamW) at batch 16, timed interleaved with the loaders.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common as C
import torch

BATCH = 16


def loader_fn(dm, per_call: int):
    it = iter(dm.train_dataloader())

    def fn():
        nonlocal it
        for _ in range(per_call):
            try:
                next(it)
            except StopIteration:  # stream mode: fixed-length epochs
                it = iter(dm.train_dataloader())
                next(it)
    return fn


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    from refiner.lit.datamodule import LatentDataModule
    from refiner.models.unet import UNetModel

    reps = 5 if args.quick else 10
    per_call = 20
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, manifest = C.tiny_shards(Path(tmp), n_images=64, maxcount=16)
        dms = {}
        for mode in ("deterministic", "stream"):
            dm = LatentDataModule(train_shards=str(shard_dir), batch_size=BATCH, mode=mode, num_workers=0, seed=0,
                                  shuffle_buffer=64)
            t0 = time.perf_counter()
            dm.setup("fit")
            dms[mode] = (dm, time.perf_counter() - t0)
        unet = UNetModel(**C.demo_unet_params()).train()
        x, t = torch.randn(BATCH, 3, 16, 16), torch.randint(250, 500, (BATCH,))
        fns = {f"loader {m}": loader_fn(dm, per_call) for m, (dm, _) in dms.items()}
        fns["train step"] = C.make_train_step(unet, x, t)
        res = C.interleaved(fns, reps=reps, warmup=1)
    consume = 1e3 / res["train step"]["median_ms"]
    rows = [["train step (consumer)", C.fmt(consume, 2), "1", "-"]]
    out = {}
    for mode, (_, setup_s) in dms.items():
        bps = per_call * 1e3 / res[f"loader {mode}"]["median_ms"]
        out[mode] = {"batches_per_s": bps, "x_consumption": bps / consume, "setup_s": setup_s}
        rows.append([f"LatentDataModule {mode}, 0 workers", C.fmt(bps, 1), f"{bps / consume:.0f}", C.fmt(setup_s, 2)])
    C.print_table(f"6. Data loading vs consumption (batch {BATCH} latents 3x16x16, {manifest['num_samples']} samples "
                  f"in {manifest['num_shards']} shards)", ["source", "batches/s", "x consumption rate", "setup s"], rows)
    C.write_result("bench_loader", {"command": C.command("bench_loader", args.quick), "timings": res, "modes": out,
                                    "consumer_batches_per_s": consume})
    return out


if __name__ == "__main__":
    main()
