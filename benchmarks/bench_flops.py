"""Row 5: achieved FLOP/s of the training step as a fraction of this CPU's measured matmul peak.

FLOPs of one forward + backward of the demo UNet (batch 16x3x16x16) are counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, SDPA; elementwise ops and
AdamW are not counted, so this is the useful-math rate). The peak is a 2048x2048 @ 2048x2048
matmul in fp32 and in bf16, timed interleaved with the fp32 and bf16-autocast training steps.
"""

from __future__ import annotations

import common as C
import torch
from torch.utils.flop_counter import FlopCounterMode

BATCH = 16
N = 2048


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    from refiner.models.unet import UNetModel

    reps = 5 if args.quick else 10
    unet = UNetModel(**C.demo_unet_params()).train()
    x, t = torch.randn(BATCH, 3, 16, 16), torch.randint(250, 500, (BATCH,))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.mse_loss(unet(x, t), torch.randn_like(x)).backward()
    unet.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    a32, b32 = torch.randn(N, N), torch.randn(N, N)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    fns = {
        "matmul fp32": lambda: a32 @ b32,
        "matmul bf16": lambda: a16 @ b16,
        "train step fp32": C.make_train_step(unet, x, t),
        "train step bf16 autocast": C.make_train_step(UNetModel(**C.demo_unet_params()).train(), x, t,
                                                      autocast_dtype=torch.bfloat16),
    }
    res = C.interleaved(fns, reps=reps, warmup=2)
    mm_flops = 2 * N**3

    def rate(name, flops, key="median_ms"):
        return flops / (res[name][key] / 1e3) / 1e9

    peak32, peak16 = rate("matmul fp32", mm_flops, "min_ms"), rate("matmul bf16", mm_flops, "min_ms")
    s32, s16 = rate("train step fp32", step_flops), rate("train step bf16 autocast", step_flops)
    rows = [
        ["matmul 2048^2 fp32 (peak, best rep)", C.fmt(peak32, 1), "1.00", "-"],
        ["matmul 2048^2 bf16 (peak, best rep)", C.fmt(peak16, 1), C.fmt(peak16 / peak32), "1.00"],
        ["train step fp32 (median)", C.fmt(s32, 1), C.fmt(s32 / peak32), C.fmt(s32 / peak16)],
        ["train step bf16 autocast (median)", C.fmt(s16, 1), C.fmt(s16 / peak32), C.fmt(s16 / peak16)],
    ]
    C.print_table(f"5. Compute efficiency (demo UNet fwd+bwd = {step_flops / 1e9:.2f} GFLOP per step at batch "
                  f"{BATCH}x3x16x16)", ["workload", "GFLOP/s", "fraction of fp32 peak", "fraction of bf16 peak"], rows)
    payload = {"command": C.command("bench_flops", args.quick), "step_flops": step_flops,
               "flops_by_op": {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()},
               "timings": res, "gflops": {"peak_fp32": peak32, "peak_bf16": peak16, "step_fp32": s32,
                                          "step_bf16": s16}}
    C.write_result("bench_flops", payload)
    return payload


if __name__ == "__main__":
    main()
