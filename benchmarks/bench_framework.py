"""Row 2: Lightning framework overhead: full ``Trainer.fit`` training step vs a bare PyTorch loop.

Lightning side (the project's training setup, minus validation/checkpointing): ``WindowRefiner``
(demo UNet of conf/model/refiner_tiny.yaml, window [250, 500)), ``LatentDataModule`` in
deterministic mode over tiny shards built by ``build_shards`` with untrained demo-sized VQ models,
``EMAWeightAveraging(decay=0.999)``, ``LearningRateMonitor``, gradient clipping 1.0, CSVLogger at the
project's default ``log_every_n_steps=10`` (conf/trainer/default.yaml), no progress bar.

Bare side, same model class, same ``diffusion_loss``, same batches (``DeterministicBatches``):
* ``bare (same work)``: loss, backward, clip_grad_norm_(1.0), AdamW, LambdaLR warm-up, EMA lerp.
* ``bare (minimal)``: loss, backward, AdamW: shows what clipping + EMA + scheduler cost.

Throughput = samples / wall time between the end of step ``warmup`` and the end of the last step,
so Trainer start-up is excluded (reported separately). Blocks alternate L, B, b, L, B, b, ...
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import common as C
import torch

BATCH = 16
WINDOW = dict(t_min=250, t_max=500, num_timesteps=1000)


def make_module():
    from refiner.lit.window_module import WindowRefiner

    cfg = C.demo_model_cfg()
    torch.manual_seed(0)
    return WindowRefiner(
        unet=C.demo_unet_params(), window=WINDOW, schedule=cfg["schedule"], base_lr=cfg["base_lr"],
        warmup_steps=cfg["warmup_steps"], seed=0, batch_size=BATCH,
        optimizer=partial(torch.optim.AdamW, weight_decay=cfg["weight_decay"], betas=cfg["betas"]),
    )


class BareLoop:
    """The same training step written as plain PyTorch, over the same deterministic batches."""

    def __init__(self, shard_dir: Path, same_work: bool):
        from refiner.data.latents import expand_shards, read_all_samples
        from refiner.data.shards import LATENT_KEYS
        from refiner.lit.datamodule import DeterministicBatches

        samples = read_all_samples(expand_shards(str(shard_dir)))
        tensors = {k: torch.stack([s[k] for s in samples]) for k in LATENT_KEYS}
        self.batches = iter(DeterministicBatches(tensors, BATCH, seed=0))
        self.module = make_module()
        cfg = C.demo_model_cfg()
        self.params = list(self.module.unet.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg["base_lr"], weight_decay=cfg["weight_decay"],
                                     betas=cfg["betas"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / cfg["warmup_steps"]))
        self.ema = [v.detach().clone() for v in self.module.state_dict().values() if v.is_floating_point()]
        self.same_work = same_work
        self.step_index = 0

    def step(self) -> None:
        from refiner.lit.window_module import step_seed

        batch = next(self.batches)
        g = torch.Generator().manual_seed(step_seed(0, 0, self.step_index, 0))
        loss, _ = self.module.diffusion_loss(batch, g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.same_work:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        if self.same_work:
            self.sched.step()
            current = [v for v in self.module.state_dict().values() if v.is_floating_point()]
            torch._foreach_lerp_(self.ema, current, 1 - 0.999)
            float(loss)  # Lightning moves the loss to a python float for logging
        self.step_index += 1


def run(shard_dir: Path, warmup: int, steps: int, log_dir: Path) -> dict:
    """One ``Trainer.fit``; after every Lightning step a callback runs one step of each bare loop and
    times it, so the three loops alternate step by step (robust to load drift on a shared machine).
    Lightning's step time = time between consecutive ``on_train_batch_end`` minus the bare steps."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EMAWeightAveraging, LearningRateMonitor
    from pytorch_lightning.loggers import CSVLogger

    from refiner.lit.datamodule import LatentDataModule

    bare = {"bare_same_work": BareLoop(shard_dir, True), "bare_minimal": BareLoop(shard_dir, False)}
    times: dict[str, list[float]] = {"lightning": [], **{k: [] for k in bare}}
    state = {"last": None, "t0": None, "first": None}

    class Interleave(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            now = time.perf_counter()
            if state["first"] is None:
                state["first"] = now - state["t0"]
            if state["last"] is not None:
                times["lightning"].append(now - state["last"])
            for name, loop in bare.items():
                t = time.perf_counter()
                loop.step()
                times[name].append(time.perf_counter() - t)
            state["last"] = time.perf_counter()

    dm = LatentDataModule(train_shards=str(shard_dir), batch_size=BATCH, mode="deterministic", num_workers=0, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps + 1, max_epochs=-1, logger=CSVLogger(str(log_dir)),
        log_every_n_steps=10, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[EMAWeightAveraging(decay=0.999), LearningRateMonitor(logging_interval="step"), Interleave()],
        gradient_clip_val=1.0, num_sanity_val_steps=0, limit_val_batches=0,
    )
    state["t0"] = time.perf_counter()
    trainer.fit(make_module(), datamodule=dm)
    # drop warm-up steps; the Lightning list is one shorter (it starts at the 2nd step)
    out = {k: v[warmup:][:steps] if k != "lightning" else v[warmup - 1:][:steps] for k, v in times.items()}
    out["fit_to_first_step_s"] = state["first"]
    return out


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warmup, steps = (3, 20) if args.quick else (5, 60)
    with tempfile.TemporaryDirectory() as tmp:
        shard_dir, manifest = C.tiny_shards(Path(tmp), n_images=64)
        res = run(shard_dir, warmup, steps, Path(tmp) / "logs")
    startup = res.pop("fit_to_first_step_s")
    stats = {k: C.summary([x * 1e3 for x in v]) for k, v in res.items()}
    # throughput from the mean step time (includes the every-10-steps logging), and from the median
    med = {k: BATCH / (statistics.mean(v)) for k, v in res.items()}
    med_median = {k: BATCH / (statistics.median(v)) for k, v in res.items()}
    overhead = med["bare_same_work"] / med["lightning"] - 1
    overhead_median = med_median["bare_same_work"] / med_median["lightning"] - 1
    overhead_min = min(res["lightning"]) / min(res["bare_same_work"]) - 1
    extras = med["bare_minimal"] / med["bare_same_work"] - 1
    rows = [
        ["Lightning fit (EMA, LR monitor, clip, CSV log /10 steps)", C.fmt(med["lightning"], 1), "1.00"],
        ["bare loop, same work (clip, EMA lerp, LambdaLR)", C.fmt(med["bare_same_work"], 1),
         C.fmt(med["bare_same_work"] / med["lightning"])],
        ["bare loop, minimal (fwd, bwd, AdamW)", C.fmt(med["bare_minimal"], 1),
         C.fmt(med["bare_minimal"] / med["lightning"])],
    ]
    C.print_table(f"2. Framework overhead (batch {BATCH}x3x16x16 latents, {steps} steps of each loop "
                  f"alternating step by step after {warmup} warm-up; samples/s from mean step time)",
                  ["loop", "samples/s", "x Lightning"], rows)
    print(f"Lightning overhead vs bare loop doing the same work: {overhead * 100:+.1f}% "
          f"(target < 10%) [from median step times: {overhead_median * 100:+.1f}%, from min step times: {overhead_min * 100:+.1f}%]; clip+EMA+scheduler cost in the bare loop: {extras * 100:+.1f}%; "
          f"Trainer.fit start-up to end of first step: {startup:.2f} s\n")
    payload = {"command": C.command("bench_framework", args.quick), "step_ms": stats, "samples_per_s_from_mean": med,
               "samples_per_s_from_median": med_median, "lightning_overhead_from_median": overhead_median,
               "lightning_overhead_from_min": overhead_min,
               "lightning_overhead_vs_same_work": overhead, "clip_ema_sched_cost": extras,
               "fit_startup_s": startup, "num_samples": manifest["num_samples"], "batch": BATCH}
    C.write_result("bench_framework", payload)
    return payload


if __name__ == "__main__":
    main()
