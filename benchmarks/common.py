"""Shared timing utilities and fixtures for the benchmark scripts.

Method (the machine is shared with other jobs, so absolute times drift; ratios measured inside one
run do not): every comparison runs its variants *interleaved* (A B C A B C ...), after warm-up
calls, and reports medians. Each script prints markdown rows and writes
``benchmarks/results/<name>.json`` (atomically, via ``refiner.io``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # scripts run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from refiner.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
THREADS = 2


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer repetitions / sizes (smoke run)")
    p.add_argument("--threads", type=int, default=THREADS)
    return p.parse_args()


def set_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)
    torch.manual_seed(0)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    except OSError:
        pass
    return []


def machine_info() -> dict:
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


# ------------------------------------------------------------------------------------------ timing
def interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2, inner: int = 1
) -> dict[str, dict]:
    """Time several variants round-robin; returns per-name median/min/all in milliseconds per call.

    ``inner`` calls make one sample (for very fast functions). Warm-up rounds are not recorded.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: summary(v) for k, v in times.items()}


def summary(ms: list[float]) -> dict:
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "n": len(ms), "all_ms": [round(x, 3) for x in ms]}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ models
def demo_unet_params(**overrides) -> dict:
    """The ``unet`` block of conf/model/refiner_tiny.yaml (the demo refiner), plus overrides."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "refiner_tiny.yaml")
    params = OmegaConf.to_container(cfg.unet, resolve=True)
    params.update(overrides)
    return params


def demo_model_cfg() -> dict:
    """schedule/parameterization/optimizer bits of refiner_tiny.yaml that resolve without Hydra."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "refiner_tiny.yaml")
    return {
        "schedule": OmegaConf.to_container(cfg.schedule),
        "base_lr": float(cfg.base_lr),
        "warmup_steps": int(cfg.warmup_steps),
        "betas": tuple(cfg.optimizer.betas),
        "weight_decay": float(cfg.optimizer.weight_decay),
    }


def demo_vq_params(factor: int, ch: int | None = None, num_res_blocks: int | None = None) -> dict:
    """VQ params of conf/first_stage/demo.yaml (f4 or f8), optionally with a larger ``ch``."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "first_stage" / "demo.yaml"))
    params = cfg[f"f{factor}"]["params"]
    if ch is not None:
        params["ddconfig"]["ch"] = ch
    if num_res_blocks is not None:
        params["ddconfig"]["num_res_blocks"] = num_res_blocks
    return params


def build_vq(params: dict):
    from refiner.models.vq import VQModel

    return VQModel(**params).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def alphas_cumprod() -> torch.Tensor:
    from refiner.diffusion import ScheduleConfig

    return ScheduleConfig(**demo_model_cfg()["schedule"]).alphas_cumprod()


def make_train_step(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, call=None, lr: float = 1e-4,
                    autocast_dtype: torch.dtype | None = None, accum: int = 1):
    """fwd + MSE-to-noise + bwd + AdamW step on fixed inputs (``call(model, x_t, t)`` -> prediction).

    With ``accum > 1`` the batch is split into ``accum`` micro-batches whose gradients are
    accumulated before one optimizer step (same samples per optimizer step).
    """
    call = call or (lambda m, a, b: m(a, b))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    x_chunks, t_chunks, n_chunks = x.chunk(accum), t.chunk(accum), noise.chunk(accum)

    def step():
        opt.zero_grad(set_to_none=True)
        for xc, tc, nc in zip(x_chunks, t_chunks, n_chunks):
            if autocast_dtype is not None:
                with torch.autocast("cpu", dtype=autocast_dtype):
                    out = call(model, xc, tc)
            else:
                out = call(model, xc, tc)
            loss = torch.nn.functional.mse_loss(out.float(), nc) / accum
            loss.backward()
        opt.step()

    return step


# ------------------------------------------------------------------------------------------ output
def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def print_table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine_info(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path


def command(name: str, quick: bool) -> str:
    return f"python benchmarks/{name}.py" + (" --quick" if quick else "")


# ------------------------------------------------------------------------------------------ data
def tiny_shards(out_root: Path, n_images: int = 64, size: int = 64, maxcount: int = 16) -> tuple[Path, dict]:
    """Random 64 px crops of the shipped demo photos -> shards built with *untrained* demo-sized VQ
    f4/f8 models (``conf/first_stage/demo.yaml`` params). Returns (shard dir, manifest)."""
    import numpy as np
    from PIL import Image

    from refiner.data.demo import demo_photos, random_crops
    from refiner.data.shards import build_shards

    img_dir = Path(out_root) / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    photos = demo_photos()
    rng = np.random.default_rng(0)
    per = -(-n_images // len(photos))
    k = 0
    for name, photo in photos.items():
        for crop in random_crops(photo, size, per, rng, scales=(0.3, 0.5, 0.8)):
            if k < n_images:
                Image.fromarray(crop).save(img_dir / f"{name}_{k:04d}.png")
                k += 1
    torch.manual_seed(0)
    f4, f8 = build_vq(demo_vq_params(4)), build_vq(demo_vq_params(8))
    shard_dir = Path(out_root) / "shards"
    manifest = build_shards(img_dir, shard_dir, f4, f8, size=size, maxcount_per_shard=maxcount, batch_size=16,
                            progress=False)
    return shard_dir, manifest
