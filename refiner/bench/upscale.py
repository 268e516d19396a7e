"""Progressive (DemoFusion-style) against direct (bicubic, then refine) upscaling on the composition benchmark:
:func:`run` on :class:`~refiner.bench.settings.BenchSettings`, its ``upscale`` block (``refiner
bench-upscale [overrides]`` over ``conf/bench.yaml``; issue 10). With ``upscale.target_sizes`` set, the command
runs :mod:`refiner.bench.upscale_targets` instead: DemoFusion beyond the training size (issue 23).

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

import torch
from PIL import Image

from refiner.bench.methods import BenchError, score
from refiner.bench.report import _json_ready
from refiner.bench import upscale_targets
from refiner.bench.upscale_targets import resize
from refiner.bench.run import Models, chain_method, check_output_dir, refine_all
from refiner.bench.settings import BenchSettings
from refiner.bench.sources import clean_heads, injected_defects
from refiner.inference.pipeline import Pipeline
from refiner.io import atomic_write_text
from refiner.sampling import steps_for
from refiner.settings import to_plain

WRITTEN_BY = "refiner bench.upscale"
OUTPUT_FILES = ("upscale.json", "upscale.md")


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
def run(settings: BenchSettings) -> dict:
    """The comparison of the module docstring on ``settings``; writes ``upscale.json`` and ``upscale.md`` into
    ``settings.output_dir``. With ``upscale.target_sizes``: the study beyond the training size instead
    (:func:`refiner.bench.upscale_targets.run`)."""
    if settings.upscale.target_sizes:
        return upscale_targets.run(settings)
    s = settings
    seeds = s.split_seeds
    out_dir = Path(s.output_dir)
    check_output_dir(out_dir, s.overwrite, OUTPUT_FILES, OUTPUT_FILES[0], WRITTEN_BY, "this command")
    if s.size % 16:
        raise BenchError(f"upscaling from size/2 needs size to be a multiple of 16, got {s.size}")
    t_starts = list(s.upscale.t_starts)
    chain = chain_method(s, t_starts)
    models = Models(s, [chain], ["defects"])
    direct = models.pipelines[chain.experts]
    progressive = Pipeline(models.f4, direct.chain, upscale=2, device=models.device)
    references = clean_heads(s.n, seeds.references, s.size)
    clean = clean_heads(s.n, seeds.images, s.size)
    sets = {"clean heads": (clean, clean), "injected defects": (injected_defects(s.n, seeds.images, s.size).inputs,
                                                                 clean)}
    res = {"written_by": WRITTEN_BY, "split": s.split, "seeds": to_plain(seeds), "n": s.n, "size": s.size,
           "t_starts": t_starts, "sources": {}}
    for name, (full, truth) in sets.items():
        small = resize(full, s.size // 2, Image.BOX)
        bicubic = resize(small, s.size, Image.BICUBIC)
        rows = [{"method": "bicubic", "unet_evals": 0, "seconds": 0.0,
                 **score(bicubic, bicubic, references, truth)}]
        for t in t_starts:
            steps = steps_for(t, s.t_per_step)
            for label, fn, evals in (("bicubic + chain", lambda: refine_all(direct, bicubic, t, s), steps),
                                     ("progressive + chain", lambda: refine_all(progressive, small, t, s), 2 * steps)):
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

