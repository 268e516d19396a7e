"""How much of the heads' composition a VQ first stage keeps: the share of clean procedural heads that still pass
the composition checker after its round trip, and the round trip's PSNR.

    python scripts/f4_round_trip.py outputs/heads/vq_f4/checkpoints/last.ckpt --seeds 7 9 --n 400 200
    python scripts/f4_round_trip.py outputs/heads/vq_f4/checkpoints/last.ckpt --mosaic 512 1024

Heads come from ``refiner.data.synthetic`` (seed s, images 0..n-1); the round trip is the pipeline's own
(:func:`refiner.inference.pipeline.vq_round_trip`); the VQ's shape is ``conf/first_stage/demo.yaml``'s f4 (or f8).

``--mosaic SIDE ...``: tiled against whole VQ, measured against the clean image (issue #10). For each seed, a
``SIDE x SIDE`` mosaic of ``(SIDE / size)^2`` heads (images 0.., row-major) goes through the round trip whole and
on the overlapping, feathered tiles ``refine.py`` uses (``Tiling().f4_tile`` / ``f4_overlap``, 256 / 32 px), and
each cell of the result is cut out again. Reported per variant: PSNR to the clean mosaic, the checker's pass rate
per cell, and for the tiled variants the PSNR to the whole-image round trip. Two references: every head round-tripped
alone (the default mode's measurement) and ``tiled, whole-image GroupNorm statistics``: the tiles normalised with
the GroupNorm statistics of the whole-image pass, an upper bound of what synchronising GroupNorm across tiles
(the Tiled VAE of pkuliyi2015/multidiffusion-upscaler-for-automatic1111, ``scripts/tilevae.py``) could recover.
It needs the whole pass, so it is a measurement only, not a remedy.
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--mosaic", type=int, nargs="+", default=[], metavar="SIDE",
                   help="mosaic sides in px (multiples of --size): tiled vs whole round trip against clean")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    if not args.mosaic and (len(args.n) != len(args.seeds) or min(args.n) < 1):
        print("error: give one positive --n per --seeds entry", file=sys.stderr)
        return 2
    if any(side < args.size or side % args.size for side in args.mosaic):
        print(f"error: --mosaic sides must be positive multiples of --size {args.size}, got {args.mosaic}",
              file=sys.stderr)
        return 2
    if not args.ckpt.is_file():
        print(f"error: checkpoint not found: {args.ckpt}", file=sys.stderr)
        return 2

    import torch
    from omegaconf import OmegaConf

    from refiner.formats.first_stage import first_stage_from_mapping

    torch.set_num_threads(args.threads)
    block = OmegaConf.load(ROOT / "conf/first_stage/demo.yaml")[args.which]
    block.ckpt_path = str(args.ckpt)
    vq = first_stage_from_mapping(OmegaConf.to_container(block, resolve=True), args.which)
    if args.mosaic:
        return mosaics(vq, args)
    return heads_alone(vq, args)


def psnr(images, references) -> float:
    import numpy as np

    mse = np.mean([((a.astype(np.float64) - b) ** 2).mean() for a, b in zip(images, references)])
    return float(10 * np.log10(255**2 / mse))


def heads_alone(vq, args) -> int:
    from refiner.data.checker import check_batch
    from refiner.data.synthetic import render_head
    from refiner.inference.pipeline import vq_round_trip

    passed = total = 0
    for seed, n in zip(args.seeds, args.n):
        clean = [render_head(seed, i, args.size) for i in range(n)]
        out = vq_round_trip(vq, clean)
        ok = sum(r.passed for r in check_batch(out))
        print(f"seed {seed}: {ok}/{n} pass the checker after the round trip, PSNR {psnr(out, clean):.2f} dB")
        passed, total = passed + ok, total + n
    print(f"all: {passed}/{total} = {passed / total:.1%}")
    return 0


def mosaic_of(cells: list, per_row: int):
    import numpy as np

    return np.concatenate([np.concatenate(cells[r * per_row:(r + 1) * per_row], axis=1)
                           for r in range(len(cells) // per_row)], axis=0)


def cells_of(image, cell: int) -> list:
    return [image[r:r + cell, c:c + cell] for r in range(0, image.shape[0], cell)
            for c in range(0, image.shape[1], cell)]


@contextlib.contextmanager
def whole_image_groupnorm(vq, x):
    """Inside the block every GroupNorm of ``vq`` normalises with the (per image, per group) mean and biased
    variance it saw in a whole-image ``decode(encode(x))``, instead of the tile's own."""
    import torch

    norms = [m for m in vq.modules() if isinstance(m, torch.nn.GroupNorm)]
    stats: dict = {}

    def recording(m):
        plain = m.forward

        def forward(h):
            g = h.reshape(h.shape[0], m.num_groups, -1).double()
            stats[m] = (g.mean(-1), g.var(-1, unbiased=False))
            return plain(h)
        return forward

    def frozen(m):
        def forward(h):
            mean, var = (s[..., None].to(h) for s in stats[m])
            g = h.reshape(h.shape[0], m.num_groups, -1)
            y = ((g - mean) / torch.sqrt(var + m.eps)).reshape(h.shape)
            return y * m.weight[None, :, None, None] + m.bias[None, :, None, None]
        return forward

    try:
        for m in norms:
            m.forward = recording(m)
        with torch.no_grad():
            vq.decode(vq.encode(x))
        for m in norms:
            m.forward = frozen(m)
        yield
    finally:
        for m in norms:
            m.__dict__.pop("forward", None)


def mosaics(vq, args) -> int:
    from refiner.data.checker import check_batch
    from refiner.data.synthetic import render_head
    from refiner.inference.pipeline import Tiling, padded_batch, vq_round_trip

    tiles = (Tiling().f4_tile, Tiling().f4_overlap)
    print(f"| mosaic | seed | heads | variant | PSNR to clean, dB | cells passing the checker | PSNR to whole, dB |")
    print("|---|---|---|---|---|---|---|")
    for side in args.mosaic:
        per_row = side // args.size
        for seed in args.seeds:
            heads = [render_head(seed, i, args.size) for i in range(per_row**2)]
            clean = mosaic_of(heads, per_row)
            alone = vq_round_trip(vq, heads)
            whole = vq_round_trip(vq, [clean])[0]
            tiled = vq_round_trip(vq, [clean], tiles=tiles)[0]
            with whole_image_groupnorm(vq, padded_batch([clean], vq.factor)):
                frozen = vq_round_trip(vq, [clean], tiles=tiles)[0]
            rows = [("each head alone", mosaic_of(alone, per_row), None), ("whole", whole, None),
                    (f"tiled {tiles[0]}/{tiles[1]} px", tiled, whole),
                    ("tiled, whole-image GroupNorm statistics", frozen, whole)]
            for name, image, ref in rows:
                ok = sum(r.passed for r in check_batch(cells_of(image, args.size)))
                to_whole = f"{psnr([image], [ref]):.2f}" if ref is not None else "-"
                print(f"| {side} px | {seed} | {per_row**2} | {name} | {psnr([image], [clean]):.2f} | "
                      f"{ok}/{per_row**2} = {ok / per_row**2:.1%} | {to_whole} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
