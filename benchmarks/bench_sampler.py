"""Row 4: sampler overhead of ``refine()`` (two window experts) vs the raw UNet calls it makes, and
vs a diffusers ``DDIMScheduler`` loop (``set_timesteps`` + ``add_noise`` + ``step``) around the same
two networks.

Experts: two demo UNets (conf/model/refiner_tiny.yaml), windows [250, 500) and [0, 250), eval mode,
no grad. ``refine(t_start=499, steps=S)`` on a uniform grid. Raw: the same S UNet calls (same x
shape, same t, same expert per t) in a bare loop. diffusers: ``DDIMScheduler`` configured like
CompVis DDIM (scaled_linear 0.0015 -> 0.0195, set_alpha_to_one=False, steps_offset=1, leading
spacing, no clipping) with ``set_timesteps(2S)``; its timesteps below 500 are S steps, same count.
"""

from __future__ import annotations

import common as C
import torch

STEPS = 20


def build_experts():
    from refiner.diffusion import Window
    from refiner.experts import Expert
    from refiner.models.unet import UNetModel

    torch.manual_seed(0)
    nets = [UNetModel(**C.demo_unet_params()).eval() for _ in range(2)]
    for net in nets:  # non-zero outputs so the sampler does real arithmetic
        for p in net.parameters():
            if not p.abs().sum():
                torch.nn.init.normal_(p, std=0.01)
    experts = [Expert(nets[0], Window(250, 500, 1000), name="500-750"), Expert(nets[1], Window(0, 250, 1000), name="751-1000")]
    return nets, experts


def build_chain():
    """The two experts of :func:`build_experts` as a :class:`refiner.inference.chain.Chain` (demo schedule)."""
    from refiner.diffusion import ScheduleConfig
    from refiner.inference.chain import Chain

    nets, experts = build_experts()
    return Chain.from_unets(nets, [s.window for s in experts], ScheduleConfig(**C.demo_model_cfg()["schedule"]),
                            unet_params=C.demo_unet_params())


def expert_for(nets, t: int):
    return nets[0] if t >= 250 else nets[1]


def diffusers_scheduler(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return sched


def make_fns(nets, experts, z: torch.Tensor, steps: int) -> dict:
    from refiner.experts import refine
    from refiner.sampling import timestep_grid

    ac = C.alphas_cumprod()
    grid = timestep_grid(499, steps, 0, "uniform", 1000)
    x_fixed = torch.randn_like(z)
    sched = diffusers_scheduler(steps)
    g = torch.Generator().manual_seed(0)

    def ours():
        refine(experts, z, t_start=499, steps=steps, alphas_cumprod=ac, generator=g)

    @torch.no_grad()
    def raw():
        for t in grid:
            expert_for(nets, t)(x_fixed, torch.full((z.shape[0],), t, dtype=torch.long))

    @torch.no_grad()
    def diffusers_loop():
        sched.set_timesteps(2 * steps)
        ts = [t for t in sched.timesteps if int(t) < 500]
        x = sched.add_noise(z, torch.randn(z.shape, generator=g), ts[0])
        for t in ts:
            out = expert_for(nets, int(t))(x, t.expand(z.shape[0]))
            x = sched.step(out, t, x).prev_sample

    sched.set_timesteps(2 * steps)
    n_diff = sum(int(t) < 500 for t in sched.timesteps)
    assert n_diff == len(grid) == steps, (n_diff, len(grid))
    return {"raw UNet calls": raw, "refine()": ours, "diffusers DDIM loop": diffusers_loop}


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    nets, experts = build_experts()
    reps = 5 if args.quick else 11
    rows, records = [], []
    for batch in (1, 8):
        z = torch.randn(batch, 3, 16, 16)
        res = C.interleaved(make_fns(nets, experts, z, STEPS), reps=reps, warmup=2)
        raw = res["raw UNet calls"]
        r_ours = res["refine()"]["median_ms"] / raw["median_ms"]
        r_ours_min = res["refine()"]["min_ms"] / raw["min_ms"]
        r_diff = res["refine()"]["median_ms"] / res["diffusers DDIM loop"]["median_ms"]
        records.append({"batch": batch, "steps": STEPS, "timings": res, "refine_over_raw": r_ours,
                        "refine_over_raw_min": r_ours_min, "refine_over_diffusers": r_diff})
        rows.append([f"{batch}x3x16x16", STEPS, C.fmt(raw["median_ms"], 1), C.fmt(res["refine()"]["median_ms"], 1),
                     C.fmt(res["diffusers DDIM loop"]["median_ms"], 1), f"{(r_ours - 1) * 100:+.1f}%",
                     f"{(r_ours_min - 1) * 100:+.1f}%", C.fmt(r_diff)])
    C.print_table("4. Sampler overhead: refine() with two experts vs its raw UNet calls and a diffusers DDIM loop",
                  ["latents", "steps", "raw UNet ms", "refine() ms", "diffusers loop ms",
                   "refine overhead (median)", "(min)", "refine / diffusers"], rows)
    C.write_result("bench_sampler", {"command": C.command("bench_sampler", args.quick), "rows": records})
    return {"rows": records}


if __name__ == "__main__":
    main()
