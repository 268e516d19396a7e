"""The README's picture: generator samples before and after the README's own refine command.

    python scripts/before_after.py [--n 8] [--out docs/demo/before_after.png] [--preset fewest_artifacts]

1. Samples the demo's full-range model (the benchmark's deliberately weak generator, 10 DDIM steps) from the held-out
   split's generator seeds (300000 + i), as the benchmark does (:func:`refiner.bench.sources.generator_samples`).
2. Writes them as PNGs and runs ``python -m refiner refine inputs=... output_dir=... preset=...`` on them as a user
   would (a subprocess: the command the README shows, with the demo's default experts and first stage).
3. Stacks inputs (top) and outputs (bottom), each pixel repeated 3 times (the heads are 64 px), into one PNG; prints
   the checker's verdict for both rows.

Needs the models of ``make demo`` under ``outputs/heads``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from refiner.bench.sources import generator_samples
from refiner.data.checker import check_batch
from refiner.data.images import encode_png, load_image, save_png_atomic
from refiner.formats.first_stage import first_stage_from_mapping
from refiner.inference.chain import Chain
from refiner.io import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "outputs" / "heads"
HOLDOUT_GENERATOR_SEED = 300000  # conf/bench.yaml: seeds.holdout.generator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "docs" / "demo" / "before_after.png"))
    parser.add_argument("--preset", default="fewest_artifacts")
    parser.add_argument("--scale", type=int, default=3, help="each pixel repeated this many times")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    chain = Chain.from_paths([DEMO / "full_range" / "checkpoints" / "last.ckpt"])
    params = yaml.safe_load((ROOT / "conf" / "first_stage" / "demo.yaml").read_text())["f4"]["params"]
    f4 = first_stage_from_mapping({"ckpt_path": str(DEMO / "vq_f4" / "checkpoints" / "last.ckpt"), "params": params},
                                  "f4").eval()
    expert = chain.experts[0]
    with torch.no_grad():
        samples = generator_samples(expert.expert(None).model, chain.alphas_cumprod,
                                    lambda z: f4.decode(z / chain.scale_factor).clamp(-1, 1),
                                    (f4.embed_dim, 64 // f4.factor, 64 // f4.factor), args.n, HOLDOUT_GENERATOR_SEED,
                                    10, expert.weights.parameterization).inputs
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in", Path(tmp) / "out"
        for i, img in enumerate(samples):
            save_png_atomic(inputs / f"sample_{i:02d}.png", img)
        cmd = [sys.executable, "-m", "refiner", "refine", f"inputs={inputs}", f"output_dir={outputs}",
               f"preset={args.preset}", f"hydra.run.dir={Path(tmp) / 'hydra'}", "progress=false"]
        subprocess.run(cmd, cwd=ROOT, check=True)
        refined = [load_image(outputs / f"sample_{i:02d}.png") for i in range(args.n)]
    before = [not r.passed for r in check_batch(samples)]
    checked = check_batch(refined)
    print(f"broken before: {sum(before)}/{args.n}, after: {sum(not r.passed for r in checked)}/{args.n}")
    for i, r in enumerate(checked):
        print(f"  after, image {i}: {'passes' if r.passed else 'fails ' + ', '.join(k for k, ok in r.rules.items() if not ok)}")
    pad = 2
    rows = []
    for images in (samples, refined):
        tiles = [np.pad(np.repeat(np.repeat(img, args.scale, 0), args.scale, 1), ((pad, pad), (pad, pad), (0, 0)),
                        constant_values=255) for img in images]
        rows.append(np.concatenate(tiles, axis=1))
    atomic_write_bytes(args.out, encode_png(np.concatenate(rows, axis=0)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
