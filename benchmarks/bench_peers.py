"""Row 1: our UNet training step vs diffusers ``UNet2DModel`` of matching size.

Matching: block channels (64, 128, 128) = model_channels 64 x channel_mult [1, 2, 2]; res blocks
per level 1 (the demo config) and 2; attention only at the lowest level (downsample factor 4) and
in the middle block; head width 32; GroupNorm(32); FiLM scale/shift time conditioning
(``use_scale_shift_norm`` / ``resnet_time_scale_shift="scale_shift"``); conv down/upsampling.
Both models are built from configs only (no hub downloads). A step is forward + MSE + backward +
AdamW, on fixed inputs, timed interleaved (ours, diffusers, ours, ...).
"""

from __future__ import annotations

import common as C
import torch


def diffusers_unet(layers: int):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=layers,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=32, resnet_time_scale_shift="scale_shift",
        flip_sin_to_cos=True, freq_shift=0, downsample_type="conv", upsample_type="conv",
    )


def main() -> dict:
    args = C.parse_args(__doc__.splitlines()[0])
    C.set_threads(args.threads)
    from refiner.models.unet import UNetModel

    reps = 5 if args.quick else 12
    layer_options = (1,) if args.quick else (1, 2)
    shapes = ((16, 3, 16, 16), (8, 3, 32, 32))
    rows, records = [], []
    for layers in layer_options:
        ours = UNetModel(**C.demo_unet_params(num_res_blocks=layers)).train()
        theirs = diffusers_unet(layers).train()
        for shape in shapes:
            x = torch.randn(shape)
            t = torch.randint(0, 1000, (shape[0],))
            fns = {
                "ours": C.make_train_step(ours, x, t),
                "diffusers": C.make_train_step(theirs, x, t, call=lambda m, a, b: m(a, b).sample),
            }
            res = C.interleaved(fns, reps=reps, warmup=2)
            ratio = res["ours"]["median_ms"] / res["diffusers"]["median_ms"]
            rec = dict(layers_per_block=layers, batch=list(shape), params_ours=C.n_params(ours),
                       params_diffusers=C.n_params(theirs), ours=res["ours"], diffusers=res["diffusers"],
                       ratio_ours_over_diffusers=ratio)
            records.append(rec)
            rows.append([layers, "x".join(map(str, shape)), f"{C.n_params(ours)/1e6:.2f}M",
                         f"{C.n_params(theirs)/1e6:.2f}M", C.fmt(res["ours"]["median_ms"], 1),
                         C.fmt(res["diffusers"]["median_ms"], 1), C.fmt(ratio)])
    C.print_table(
        "1. Training step vs diffusers UNet2DModel (fwd+bwd+AdamW, ms/step, medians of interleaved reps)",
        ["res blocks/level", "batch", "params ours", "params diffusers", "ours ms", "diffusers ms",
         "ours / diffusers"], rows)
    C.write_result("bench_peers", {"command": C.command("bench_peers", args.quick), "rows": records,
                                   "compvis_package": "none on PyPI ships ldm.modules.diffusionmodules.openaimodel "
                                                      "('latent-diffusion' 0.1.0 is a hello-world stub, 'ldm' 0.1.3 "
                                                      "is an unrelated 2018 face-landmark package)"})
    return {"rows": records}


if __name__ == "__main__":
    main()
