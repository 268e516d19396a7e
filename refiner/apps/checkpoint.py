"""Window checkpoint files from the command line: ``refiner-checkpoint export CKPT OUT.safetensors [--force]``
(also ``python -m refiner.apps.checkpoint``) writes the safetensors export; ``refiner-checkpoint inspect PATH``
says what kind of checkpoint a file is. Export never writes onto its input (any path spelling or link) and
replaces an existing output only with ``--force``; errors are one ``error:`` line, exit 2 (:mod:`refiner.cli`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from refiner.formats.kinds import kind_text, prefix_summary, state_dict_of
from refiner.formats.safe_load import is_safetensors, safe_torch_load
from refiner.formats.window_files import export_safetensors, load_export


def _lora_note(obj) -> str:
    from refiner.formats.lora import BASE_KEY, lora_settings

    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    settings = lora_settings(hp) if isinstance(hp, dict) else None
    if settings is None:
        return ""
    base = hp.get(BASE_KEY) or {}
    return (f"; LoRA adapters only (rank {settings.rank}, alpha {settings.alpha:g}) on base {base.get('path')} "
            f"(weights fingerprint {base.get('fingerprint')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refiner-checkpoint", description="Export or inspect window checkpoint files.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="window .ckpt -> .safetensors (EMA weights by default)")
    ex.add_argument("ckpt")
    ex.add_argument("out")
    ex.add_argument("--raw", action="store_true", help="export the raw (non-EMA) weights")
    ex.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling (trusted files only)")
    ins = sub.add_parser("inspect", help="say what kind of checkpoint a file is")
    ins.add_argument("path")
    ins.add_argument("--trust-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from refiner.cli import run_cli

    def body() -> None:
        if args.command == "export":
            print(export_safetensors(args.ckpt, args.out, use_ema=not args.raw, trust_checkpoint=args.trust_checkpoint,
                                     force=args.force))
            return
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
