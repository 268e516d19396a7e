"""Row 12: what artifact detection costs in the refine loop (issue 11), as ratios to plain refinement.

Models: the demo architecture with untrained weights (timing does not depend on them): the VQ-f4 of
conf/first_stage/demo.yaml and the two window experts of bench_sampler (refiner_tiny UNets, [250, 500) and
[0, 250)). A batch of 16 images of 64 px, refined from t_start 499 with 25 DDIM steps (the benchmark's density).
Variants, timed round-robin:

* ``refine``: ``Pipeline.refine_images`` alone (encode, 25 UNet steps, decode);
* ``refine + recorder``: the same loop with a ``StepRecorder`` observing every step (what ASCED adds *inside*
  the sampling loop during generation: the weighted score and x0 kept per step);
* ``probe <detector> + refine``: ``probe_detect`` (12 steps of the top window, the detector, for ``asced_code``
  one f4 decode per recorded step and scipy's per-image filtering) followed by the refinement;
* ``refine + colour fix``: the refinement, then ``ColorFix`` (wavelet, 3 levels, shift <= 8: ``refine.py``'s
  ``color_fix.method=wavelet``) on its uint8 outputs.
"""

from __future__ import annotations

import common as C
import numpy as np
import torch
from bench_sampler import build_chain


def main() -> None:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    from refiner.artifacts.color_fix import ColorFix
    from refiner.artifacts.dynamics import StepRecorder
    from refiner.inference.pipeline import Pipeline, padded_batch
    from refiner.inference.probe import probe_detect

    torch.manual_seed(0)
    f4 = C.build_vq(C.demo_vq_params(4))
    chain = build_chain()
    pipe = Pipeline(f4, chain)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4 if args.quick else 16)]

    def refine():
        pipe.refine_images(images, 499, 25)

    def refine_recorded():
        with torch.no_grad():
            z = f4.encode(padded_batch(images, pipe.multiple)) * chain.scale_factor
            noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
            rec = StepRecorder(chain.alphas_cumprod, "eps")
            out = chain.refine(z, 499, 25, noise=noise, callback=rec).latent
            f4.decode(out / chain.scale_factor)

    fix = ColorFix("wavelet", 3, 8.0)
    variants = {"refine": refine, "refine + recorder": refine_recorded,
                "refine + colour fix": lambda: fix(pipe.refine_images(images, 499, 25)[0], images)}
    for method in ("asced", "asced_code", "residual"):
        variants[f"probe {method} + refine"] = (
            lambda m=method: (probe_detect(pipe, images, m, 499, 12), refine()))
    reps = 2 if args.quick else 5
    timings = C.interleaved(variants, reps=reps, warmup=1)
    base = timings["refine"]["median_ms"]
    rows = [[name, C.fmt(t["median_ms"] / len(images), 1), C.fmt(t["median_ms"] / base)]
            for name, t in timings.items()]
    table = C.print_table(f"Artifact detection overhead ({len(images)} images of 64 px, t_start 499, 25 steps)",
                          ["variant", "ms / image", "ratio to refine"], rows)
    C.write_result("bench_artifacts", {"command": C.command("bench_artifacts", args.quick), "reps": reps,
                                       "images": len(images), "results": timings, "table": table})


if __name__ == "__main__":
    main()
