"""LoRA (peft adapters on the default targets) vs a full finetune of the same window UNet.

Per size, each variant runs in its own fresh subprocess, alternated A B A B (``--rounds``): build the UNet (random
base weights; LoRA: injected by ``refiner.models.lora.inject_lora``, so exactly what ``model.lora.rank`` trains),
then fwd + eps-MSE + bwd + AdamW steps on fixed inputs (``common.make_train_step``; AdamW keeps state only for
parameters that get gradients). Reported per variant: trainable parameters, median step time over all timed steps
of all rounds (after 2 warm-up steps per subprocess), and peak memory: ``ru_maxrss`` at the end minus the resident
size after building the model, i.e. what training adds on top of the weights (gradients, optimizer state,
activations), max over rounds. At the demo size it also trains both through Lightning (``WindowRefiner`` +
``TrainableEMA`` + ``ModelCheckpoint``, 2 steps) and reports the ``last.ckpt`` sizes.

Sizes: ``demo`` = conf/model/refiner_tiny.yaml's UNet at batch 16 x 3 x 16 x 16; ``ffhq`` =
conf/model/ldm_vq4_ffhq.yaml's UNet (CompVis LDM-VQ-4) at batch 1 x 3 x 64 x 64 (skipped with ``--quick``).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as C

RANK = 4
SIZES = {"demo": dict(batch=16, side=16, steps=10), "ffhq": dict(batch=1, side=64, steps=3)}


def unet_params(size: str) -> dict:
    from omegaconf import OmegaConf

    params = C.demo_unet_params()
    if size == "ffhq":
        params.update(OmegaConf.to_container(OmegaConf.load(C.ROOT / "conf/model/ldm_vq4_ffhq.yaml").unet))
    return params


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(size: str, variant: str, threads: int) -> dict:
    import torch

    from refiner.models.lora import LoraSettings, inject_lora
    from refiner.models.unet import UNetModel

    C.set_threads(threads)
    spec = SIZES[size]
    unet = UNetModel(**unet_params(size))
    if variant == "lora":
        inject_lora(unet, LoraSettings(rank=RANK, alpha=float(RANK)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(spec["batch"], 3, spec["side"], spec["side"], generator=g)
    t = torch.randint(0, 250, (spec["batch"],), generator=g)
    step = C.make_train_step(unet, x, t)
    base = rss_mb()
    for _ in range(2):
        step()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(size=size, variant=variant, params=C.n_params(unet),
                trainable=sum(p.numel() for p in unet.parameters() if p.requires_grad), step_ms=times,
                weights_rss_mb=base, train_overhead_mb=peak - base)


def checkpoint_sizes(threads: int) -> dict:
    """``last.ckpt`` bytes of a full and a LoRA window trained 2 steps through Lightning at the demo size."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from refiner.lit.ema import TrainableEMA
    from refiner.lit.window_module import WindowRefiner

    C.set_threads(threads)
    batches = [{"z_clean": torch.randn(16, 3, 16, 16), "z_degraded": torch.randn(16, 3, 16, 16)} for _ in range(2)]
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora in (("full", None), ("lora", dict(rank=RANK))):
            module = WindowRefiner(unet=unet_params("demo"), window=dict(t_min=0, t_max=250, num_timesteps=1000),
                                   schedule=C.demo_model_cfg()["schedule"], lora=lora)
            saver = ModelCheckpoint(dirpath=Path(tmp) / name, save_last=True, every_n_train_steps=2)
            pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp, limit_val_batches=0,
                       callbacks=[TrainableEMA(decay=0.999), saver]).fit(
                module, train_dataloaders=DataLoader(batches, batch_size=None))
            sizes[name] = (Path(tmp) / name / "last.ckpt").stat().st_size
    return sizes


def main() -> None:
    args = C.parse_args(__doc__.split("\n")[0])
    rounds = 1 if args.quick else 2
    sizes = ["demo"] if args.quick else ["demo", "ffhq"]
    runs: list[dict] = []
    for size in sizes:
        for _ in range(rounds):
            for variant in ("full", "lora"):  # A B A B: fresh subprocess each
                out = subprocess.run([sys.executable, __file__, "--run", size, variant, str(args.threads)],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{size} {variant}: median {statistics.median(runs[-1]['step_ms']):.1f} ms", flush=True)
    ckpt = json.loads(subprocess.run([sys.executable, __file__, "--ckpt", str(args.threads)], capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1])
    rows, results = [], {}
    for size in sizes:
        v = {name: [r for r in runs if r["size"] == size and r["variant"] == name] for name in ("full", "lora")}
        med = {name: statistics.median([t for r in v[name] for t in r["step_ms"]]) for name in v}
        mem = {name: max(r["train_overhead_mb"] for r in v[name]) for name in v}
        full, lora = v["full"][0], v["lora"][0]
        results[size] = dict(params=full["params"], trainable_full=full["trainable"], trainable_lora=lora["trainable"],
                             step_ms=med, train_overhead_mb=mem, weights_rss_mb=full["weights_rss_mb"],
                             spec=SIZES[size])
        rows.append([size, f"{full['params'] / 1e6:.2f}M", f"{lora['trainable'] / 1e3:.1f}k "
                     f"({100 * lora['trainable'] / full['params']:.1f}%)",
                     f"{C.fmt(med['full'], 1)} / {C.fmt(med['lora'], 1)} ms = **{med['lora'] / med['full']:.2f}**",
                     f"{mem['full']:.0f} / {mem['lora']:.0f} MB = **{mem['lora'] / mem['full']:.2f}**"])
    ratio = ckpt["full"] / ckpt["lora"]
    C.print_table(f"LoRA rank {RANK} (default targets) vs full finetune",
                  ["size", "params", "trainable (LoRA)", "step full / LoRA", "training memory full / LoRA"], rows)
    print(f"last.ckpt at the demo size: full {ckpt['full'] / 1e6:.2f} MB, LoRA {ckpt['lora'] / 1e3:.0f} kB "
          f"= {ratio:.1f}x smaller")
    C.write_result("bench_lora", dict(rank=RANK, rounds=rounds, runs=runs, results=results, checkpoint_bytes=ckpt,
                                      checkpoint_ratio=ratio, command=C.command("bench_lora", args.quick)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--ckpt":
        print(json.dumps(checkpoint_sizes(int(sys.argv[2]))))
    else:
        main()
