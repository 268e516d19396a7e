"""Progressive (DemoFusion-style) against direct (bicubic, then refine) upscaling on the composition benchmark:
``python -m refiner.bench.upscale [overrides]`` (``conf/bench.yaml``, its ``upscale`` group; issue 10).

Inputs: the split's clean heads and its injected-defect heads, rendered at ``size`` and reduced x2 (PIL's box
filter) to ``size / 2``. Every method returns ``size`` px pictures, scored by :func:`refiner.bench.methods.score`
(the checker's artifact rate, SWD to the clean references, RMSE to the bicubic upscale as faithfulness, and PSNR
to the full-size clean heads, i.e. how much of the original was recovered):

* ``bicubic``: PIL's bicubic x2, no model;
* ``bicubic + chain``: refine the bicubic upscale at each t_start (``Pipeline``, ``upscale=1``);
* ``progressive + chain``: ``Pipeline(upscale=2)`` at each t_start (:mod:`refiner.inference.progressive`: latent
  bicubic x2, skip residual, MultiDiffusion local path mixed with the dilated global path).

Both diffusion methods use ``steps_for(t_start)`` grid points; the progressive one calls the UNet on the local and
the global path at every step, so it spends about twice the UNet evaluations (reported). Writes ``upscale.json``
and ``upscale.md`` into ``output_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from refiner.bench.methods import BenchError, Method, score
from refiner.bench.report import _json_ready
from refiner.bench.run import Models, _check_settings, check_output_dir, refine_all
from refiner.bench.sources import clean_heads, injected_defects
from refiner.inference.pipeline import Pipeline
from refiner.io import atomic_write_text
from refiner.sampling import steps_for

WRITTEN_BY = "refiner bench.upscale"
OUTPUT_FILES = ("upscale.json", "upscale.md")


def _resize(images, size: int, resample) -> list[np.ndarray]:
    return [np.asarray(Image.fromarray(img).resize((size, size), resample)) for img in images]


def markdown(res: dict) -> str:
    lines = [f"# Upscaling x2 from {res['size'] // 2} px: progressive (DemoFusion-style) vs bicubic then refine; "
             f"split `{res['split']}`, {res['n']} images per source", ""]
    for name, rows in res["sources"].items():
        lines += [f"## {name}", "", "| method | artifact rate | PSNR to clean (dB) | SWD×1e3 | RMSE to bicubic | "
                  "UNet evals/image | s |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {100 * r['artifact_rate']:.1f}% | {r['psnr_to_clean']:.2f} | "
                         f"{r['swd_x1e3']:.1f} | {r['rmse_to_input']:.3f} | {r['unet_evals']} | {r['seconds']} |")
        lines.append("")
    return "\n".join(lines)


@torch.no_grad()
def run(cfg: DictConfig) -> dict:

    seeds, _ = _check_settings(cfg)
    out_dir = Path(cfg.output_dir)
    check_output_dir(out_dir, bool(cfg.overwrite), OUTPUT_FILES, OUTPUT_FILES[0], WRITTEN_BY, "this command")
    if cfg.size % 16:
        raise BenchError(f"upscaling from size/2 needs size to be a multiple of 16, got {cfg.size}")
    t_starts = [int(t) for t in cfg.upscale.t_starts]
    chain_method = Method("chain", "diffusion", tuple(t_starts), tuple(str(s) for s in cfg.methods.chain.experts))
    models = Models(cfg, [chain_method], ["defects"])
    direct = models.pipelines[chain_method.experts]
    progressive = Pipeline(models.f4, direct.chain, upscale=2, device=models.device)
    references = clean_heads(cfg.n, seeds["references"], cfg.size)
    clean = clean_heads(cfg.n, seeds["images"], cfg.size)
    sets = {"clean heads": (clean, clean), "injected defects": (injected_defects(cfg.n, seeds["images"], cfg.size).inputs,
                                                                 clean)}
    res = {"written_by": WRITTEN_BY, "split": cfg.split, "seeds": dict(seeds), "n": cfg.n, "size": cfg.size,
           "t_starts": t_starts, "sources": {}}
    for name, (full, truth) in sets.items():
        small = _resize(full, cfg.size // 2, Image.BOX)
        bicubic = _resize(small, cfg.size, Image.BICUBIC)
        rows = [{"method": "bicubic", "unet_evals": 0, "seconds": 0.0,
                 **score(bicubic, bicubic, references, truth)}]
        for t in t_starts:
            steps = steps_for(t, cfg.t_per_step)
            for label, fn, evals in (("bicubic + chain", lambda: refine_all(direct, bicubic, t, cfg), steps),
                                     ("progressive + chain", lambda: refine_all(progressive, small, t, cfg), 2 * steps)):
                t0 = time.perf_counter()
                outs = fn()
                rows.append({"method": f"{label}, t_start {t}", "unet_evals": evals,
                             "seconds": round(time.perf_counter() - t0, 1), **score(outs, bicubic, references, truth)})
        for r in rows:
            r.pop("failed", None)
        res["sources"][name] = rows
    out_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_text(out_dir / OUTPUT_FILES[0], json.dumps(_json_ready(res), indent=2) + "\n")
    atomic_write_text(out_dir / "upscale.md", markdown(res))
    return res


if __name__ == "__main__":
    from refiner.apps.bench import upscale_main

    upscale_main()
