"""How much of the heads' composition a VQ first stage keeps: the share of clean procedural heads that still pass
the composition checker after its round trip, and the round trip's PSNR.

    python scripts/f4_round_trip.py outputs/heads/vq_f4/checkpoints/last.ckpt --seeds 7 9 --n 400 200

Heads come from ``refiner.data.synthetic`` (seed s, images 0..n-1); the round trip is the pipeline's own
(:func:`refiner.inference.pipeline.vq_round_trip`); the VQ's shape is ``conf/first_stage/demo.yaml``'s f4 (or f8).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 9])
    p.add_argument("--n", type=int, nargs="+", default=[400, 200], help="heads per seed")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--which", choices=["f4", "f8"], default="f4")
    args = p.parse_args()
    if len(args.n) != len(args.seeds) or min(args.n) < 1:
        print("error: give one positive --n per --seeds entry", file=sys.stderr)
        return 2
    if not args.ckpt.is_file():
        print(f"error: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2

    import numpy as np
    from omegaconf import OmegaConf

    from refiner.bench.checker import check_batch
    from refiner.data.synthetic import render_head
    from refiner.formats.compvis import first_stage_from_config
    from refiner.inference.pipeline import vq_round_trip

    block = OmegaConf.load(ROOT / "conf/first_stage/demo.yaml")[args.which]
    block.ckpt_path = str(args.ckpt)
    vq = first_stage_from_config(block, args.which)
    passed = total = 0
    for seed, n in zip(args.seeds, args.n):
        clean = [render_head(seed, i, args.size) for i in range(n)]
        out = vq_round_trip(vq, clean)
        ok = sum(r.passed for r in check_batch(out))
        mse = np.mean([((o.astype(float) - c) ** 2).mean() for o, c in zip(out, clean)])
        print(f"seed {seed}: {ok}/{n} pass the checker after the round trip, PSNR {10 * np.log10(255**2 / mse):.2f} dB")
        passed, total = passed + ok, total + n
    print(f"all: {passed}/{total} = {passed / total:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
