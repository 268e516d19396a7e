"""Row 3: training from precomputed f4 latents vs encoding 64 px images with the VQ-f4 on the fly.

Precomputed: one training step of the demo UNet on a batch of 16x3x16x16 latents.
On the fly: ``f4.encode`` (no grad) of the 16x3x64x64 clean images, then the same training step.
(The refiner has ``conditioning: null``, so only the clean image is encoded; a concat-conditioned
model would also need the f8 round trip and a second f4 encode per batch.) First stages are
untrained, built from configs: the demo f4 of conf/first_stage/demo.yaml (ch 32, 1 res block) and,
unless --quick, a CompVis-sized f4 encoder (ch 128, ch_mult [1,2,4], 2 res blocks).
"""

from __future__ import annotations

import common as C
import torch

BATCH = 16


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    from refiner.models.unet import UNetModel

    reps = 4 if args.quick else 8
    unet = UNetModel(**C.demo_unet_params()).train()
    images = torch.rand(BATCH, 3, 64, 64) * 2 - 1
    vqs = {"demo f4 (ch 32)": C.build_vq(C.demo_vq_params(4))}
    if not args.quick:
        vqs["CompVis-size f4 (ch 128, 2 res blocks)"] = C.build_vq(C.demo_vq_params(4, ch=128, num_res_blocks=2))
    latent = torch.randn(BATCH, 3, 16, 16)
    t = torch.randint(250, 500, (BATCH,))
    train = C.make_train_step(unet, latent, t)

    def on_the_fly(vq):
        def fn():
            with torch.no_grad():
                z = vq.encode(images)
            step_on(z)
        return fn

    def step_on(z):  # train step on freshly encoded latents (same cost as `train`, fresh input)
        latent.copy_(z)
        train()

    fns = {"precomputed": train, **{name: on_the_fly(vq) for name, vq in vqs.items()}}
    res = C.interleaved(fns, reps=reps, warmup=1)
    base = res["precomputed"]["median_ms"]
    rows = [["precomputed latents", C.fmt(BATCH / base * 1e3, 1), "1.00", "1.00", "-"]]
    for name, vq in vqs.items():
        r = res[name]
        rows.append([f"encode on the fly, {name}", C.fmt(BATCH / r["median_ms"] * 1e3, 1),
                     C.fmt(base / r["median_ms"]), C.fmt(res["precomputed"]["min_ms"] / r["min_ms"]),
                     f"{C.n_params(vq.encoder) / 1e6:.2f}M"])
    C.print_table(f"3. Precomputed latents vs on-the-fly f4 encoding (batch {BATCH}, 64 px -> 16x16 latents)",
                  ["input", "samples/s", "throughput vs precomputed (median)", "(min)", "f4 encoder params"], rows)
    C.write_result("bench_latents", {"command": C.command("bench_latents", args.quick), "timings": res,
                                     "speedup_precomputed": {k: res[k]["median_ms"] / base for k in vqs}})
    return res


if __name__ == "__main__":
    main()
