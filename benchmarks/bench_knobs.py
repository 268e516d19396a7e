"""Row 8: speed knobs on the training step and on the sampler, to decide defaults.

Training step: demo UNet, batch 16x3x16x16, fwd + bwd + AdamW. Sampler: two-expert ``refine()``
(t_start=499, 10 steps) on 1x3x64x64 latents (a 256 px image). Every variant has its own model
copy; all variants of one workload are timed interleaved against the baseline (fp32, SDPA,
contiguous, 2 threads, eager). Knobs: channels_last, bf16 autocast, "math" attention, gradient
accumulation (2 x batch/2 vs 1 x batch, same samples per optimizer step), gradient checkpointing
(``use_checkpoint``), 1 thread instead of 2, and (not in --quick) ``torch.compile`` with its
compile time measured separately (first call minus a baseline call). For the sampler, the relative
L2 difference of the refined latent vs the fp32 baseline (same noise) is also reported.
"""

from __future__ import annotations

import copy

import common as C
import torch

BATCH = 16
SAMPLER_LATENT = (1, 3, 64, 64)
SAMPLER_STEPS = 10


def with_threads(n: int, fn, restore: int):
    def run():
        torch.set_num_threads(n)
        try:
            fn()
        finally:
            torch.set_num_threads(restore)
    return run


def train_variants(quick: bool, threads: int) -> tuple[dict, dict]:
    from refiner.models.unet import UNetModel

    torch.manual_seed(0)
    base = UNetModel(**C.demo_unet_params()).train()
    x, t = torch.randn(BATCH, 3, 16, 16), torch.randint(250, 500, (BATCH,))
    xcl = x.contiguous(memory_format=torch.channels_last)
    math_net = copy.deepcopy(base)
    math_net.set_attention_backend("math")
    ckpt_net = UNetModel(**C.demo_unet_params(use_checkpoint=True)).train()
    ckpt_net.load_state_dict(base.state_dict())
    fns = {
        "baseline": C.make_train_step(base, x, t),
        "channels_last": C.make_train_step(copy.deepcopy(base).to(memory_format=torch.channels_last), xcl, t),
        "bf16 autocast": C.make_train_step(copy.deepcopy(base), x, t, autocast_dtype=torch.bfloat16),
        "math attention": C.make_train_step(math_net, x, t),
        "grad accumulation 2 x 8": C.make_train_step(copy.deepcopy(base), x, t, accum=2),
        "gradient checkpointing": C.make_train_step(ckpt_net, x, t),
        "1 thread": with_threads(1, C.make_train_step(copy.deepcopy(base), x, t), threads),
    }
    info = {}
    if not quick:
        compiled = torch.compile(copy.deepcopy(base))
        step = C.make_train_step(compiled, x, t)
        _, first = C.timed(step)
        _, ref = C.timed(fns["baseline"])
        info["compile_s"] = first - ref
        fns["torch.compile"] = step
    return fns, info


def sampler_variants(quick: bool, threads: int) -> tuple[dict, dict, dict]:
    from bench_sampler import build_experts

    from refiner.experts import Expert, refine

    ac = C.alphas_cumprod()
    nets, experts = build_experts()
    z = torch.randn(SAMPLER_LATENT)
    noise = torch.randn(SAMPLER_LATENT, generator=torch.Generator().manual_seed(1))
    outputs: dict = {}

    def restaged(wrap):
        return [Expert(wrap(s.model), s.window, s.parameterization, s.name) for s in experts]

    def sampler(name, st, zz=z):
        def run():
            outputs[name] = refine(st, zz, t_start=499, steps=SAMPLER_STEPS, alphas_cumprod=ac, noise=noise)
        return run

    def bf16(model):
        def call(x, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, t).float()
        return call

    def math(model):
        m = copy.deepcopy(model)
        m.set_attention_backend("math")
        return m

    zcl = z.contiguous(memory_format=torch.channels_last)
    fns = {
        "baseline": sampler("baseline", experts),
        "channels_last": sampler("channels_last", restaged(lambda m: copy.deepcopy(m).to(
            memory_format=torch.channels_last)), zcl),
        "bf16 autocast": sampler("bf16 autocast", restaged(bf16)),
        "math attention": sampler("math attention", restaged(math)),
        "1 thread": with_threads(1, sampler("1 thread", experts), threads),
    }
    info = {}
    if not quick:
        comp = sampler("torch.compile", restaged(lambda m: torch.compile(copy.deepcopy(m))))
        _, first = C.timed(comp)
        _, ref = C.timed(fns["baseline"])
        info["compile_s"] = first - ref
        fns["torch.compile"] = comp
    return fns, info, outputs


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    reps = 5 if args.quick else 9
    train_fns, train_info = train_variants(args.quick, args.threads)
    train = C.interleaved(train_fns, reps=reps, warmup=2)
    samp_fns, samp_info, outputs = sampler_variants(args.quick, args.threads)
    samp = C.interleaved(samp_fns, reps=reps, warmup=1)
    ref_out = outputs["baseline"]
    rel = {k: float((v.float() - ref_out).norm() / ref_out.norm()) for k, v in outputs.items()}
    rows = []
    for name in train:
        tr = train["baseline"]["median_ms"] / train[name]["median_ms"]
        tr_min = train["baseline"]["min_ms"] / train[name]["min_ms"]
        if name in samp:
            sa = C.fmt(samp["baseline"]["median_ms"] / samp[name]["median_ms"])
            sa_min = C.fmt(samp["baseline"]["min_ms"] / samp[name]["min_ms"])
            err = f"{rel[name]:.1e}"
        else:
            sa = sa_min = err = "n/a"
        rows.append([name, C.fmt(train[name]["median_ms"], 1), C.fmt(tr), C.fmt(tr_min), sa, sa_min, err])
    C.print_table(
        f"8. Speed knobs (speed-up = baseline time / variant time; >1 is faster). Train: {BATCH}x3x16x16 "
        f"fwd+bwd+AdamW; sampler: refine() 2 experts, {SAMPLER_STEPS} steps, latent {'x'.join(map(str, SAMPLER_LATENT))}",
        ["knob", "train ms", "train speed-up (median)", "(min)", "sampler speed-up (median)", "(min)",
         "sampler rel. L2 diff vs fp32"], rows)
    if train_info or samp_info:
        print(f"torch.compile compile time: training {train_info.get('compile_s', float('nan')):.1f} s, "
              f"sampler (2 experts) {samp_info.get('compile_s', float('nan')):.1f} s\n")
    payload = {"command": C.command("bench_knobs", args.quick), "train": train, "sampler": samp,
               "sampler_rel_l2": rel, "compile_s": {"train": train_info.get("compile_s"),
                                                     "sampler": samp_info.get("compile_s")}}
    C.write_result("bench_knobs", payload)
    return payload


if __name__ == "__main__":
    main()
