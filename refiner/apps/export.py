"""``refiner export``: window experts to other ecosystems; ``refiner inspect PATH``: what kind of checkpoint a file is.

``refiner export diffusers CHAIN... OUT``: one or more window checkpoints (our ``.ckpt`` or an
exported ``.safetensors``) -> a diffusers folder (``unet/``, ``unet_2/``..., ``vqvae/``, ``scheduler/``,
``refiner_chain.json``, ``README.md``; a single full-range window is also a standard ``LDMPipeline``
folder). See :func:`refiner.formats.exports.export_diffusers`. A LoRA window (adapters + base reference) is exported merged.

``refiner export peft LORA_CKPT OUT``: the adapters of a LoRA window as a peft adapter folder
(``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``); see
:func:`refiner.formats.exports.export_peft_adapter`.

``refiner export safetensors CKPT OUT.safetensors``: one window
(a LoRA window merged) as our ``.safetensors``, with its model card beside it (``OUT.README.md``); see
:func:`refiner.formats.exports.export_safetensors`.

Every export writes a model card (:mod:`refiner.formats.model_card`). A folder export (diffusers, peft) never
replaces a folder it did not write: ``--force`` replaces only a previous export of the same kind, marked by its
manifest (``refiner_chain.json``, ``adapter_config.json``) and holding nothing else
(:func:`refiner.io.write_export_folder`). Likewise ``refiner export safetensors --force`` replaces only a previous
window export and its model card, never another file. A symlinked output is resolved: the export it points to is
replaced and the link kept.

The old ``refiner-checkpoint export|inspect`` and ``python -m refiner.export`` are deprecated aliases of these.

Exit code 2 on a bad input, with a one-line message.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from refiner.cli import run_cli
from refiner.formats.exports import export_diffusers, export_peft_adapter, export_safetensors
from refiner.formats.kinds import kind_text, prefix_summary, state_dict_of
from refiner.formats.lora import BASE_KEY, lora_settings
from refiner.formats.safe_load import CheckpointError, is_safetensors, safe_torch_load
from refiner.formats.window_files import load_export


def _load_params(path: str | None) -> dict | None:
    """First-stage params from a YAML/JSON file: either the params themselves or a ``{params: ...}`` block."""
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"--first-stage-params {path}: cannot read ({err})") from err
    if isinstance(data, dict) and "params" in data and "ddconfig" not in data:
        data = data["params"]
    if not isinstance(data, dict) or "ddconfig" not in data:
        raise CheckpointError(f"--first-stage-params {path}: expected a mapping with ddconfig, n_embed, embed_dim")
    return data


def _switches(p: argparse.ArgumentParser, raw: str, force: str) -> None:
    """The switches every exporter takes: --raw, --force, --trust-checkpoint."""
    p.add_argument("--raw", action="store_true", help=raw)
    p.add_argument("--force", action="store_true", help=force)
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (trusted files only)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refiner export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    d = sub.add_parser("diffusers", help="window checkpoints -> a diffusers folder (UNet2DModel, VQModel, DDIMScheduler)")
    d.add_argument("paths", nargs="+", metavar="CHAIN... OUT", help="window checkpoints, then the output folder")
    d.add_argument("--first-stage", help="VQ-f4 checkpoint (default: first_stage.ckpt_path recorded in the windows)")
    d.add_argument("--first-stage-params", help="YAML/JSON with the VQ params (default: recorded in the windows)")
    _switches(d, "export the raw (non-EMA) weights of .ckpt windows",
              "replace an existing output folder if it is a previous diffusers export (refiner_chain.json, nothing else)")
    p = sub.add_parser("peft", help="LoRA window checkpoint -> a peft adapter folder (adapters only, not merged)")
    p.add_argument("ckpt", help="a LoRA window .ckpt (trained with model.lora.rank > 0)")
    p.add_argument("out", help="the output folder")
    _switches(p, "export the raw (non-EMA) adapters",
              "replace an existing output folder if it is a previous peft export (adapter_config.json, nothing else)")
    st = sub.add_parser("safetensors", help="window checkpoint -> our .safetensors plus a model card beside it")
    st.add_argument("ckpt", help="a window .ckpt (a LoRA window is merged into its base)")
    st.add_argument("out", help="the .safetensors file; the card goes to <name>.README.md beside it")
    _switches(st, "export the raw (non-EMA) weights",
              "replace a previous export (a refiner .safetensors and its card; never the input or another file)")
    args = parser.parse_args(argv)
    if args.format == "diffusers" and len(args.paths) < 2:
        parser.error("give at least one window checkpoint and the output folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def body() -> None:
        if args.format == "safetensors":

            print(export_safetensors(args.ckpt, args.out, use_ema=not args.raw, trust_checkpoint=args.trust_checkpoint,
                                     force=args.force))
            return
        if args.format == "peft":

            print(export_peft_adapter(args.ckpt, args.out, use_ema=not args.raw,
                                      trust_checkpoint=args.trust_checkpoint, force=args.force))
            return

        print(export_diffusers(args.paths[:-1], args.paths[-1], first_stage=args.first_stage,
                               first_stage_params=_load_params(args.first_stage_params), use_ema=not args.raw,
                               trust_checkpoint=args.trust_checkpoint, force=args.force))

    return run_cli(body)



def _lora_note(obj) -> str:
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    settings = lora_settings(hp) if isinstance(hp, dict) else None
    if settings is None:
        return ""
    base = hp.get(BASE_KEY) or {}
    return (f"; LoRA adapters only (rank {settings.rank}, alpha {settings.alpha:g}) on base {base.get('path')} "
            f"(weights fingerprint {base.get('fingerprint')})")


def inspect_main(argv: list[str] | None = None) -> int:
    """``refiner inspect PATH [--trust-checkpoint]``: one line saying what the file is."""
    parser = argparse.ArgumentParser(prog="refiner inspect", description="Say what kind of checkpoint a file is.")
    parser.add_argument("path")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (trusted files only)")
    args = parser.parse_args(argv)

    def body() -> None:
        p = Path(args.path)
        if is_safetensors(p):
            ww = load_export(p)
            print(f"{p}: refiner-window export, window {ww.window}, {len(ww.unet_state)} tensors")
        else:
            obj = safe_torch_load(p, args.trust_checkpoint)
            sd = state_dict_of(obj) or {}
            print(f"{p}: {kind_text(obj)}; {len(sd)} tensors; {prefix_summary(sd, depth=1)}{_lora_note(obj)}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
