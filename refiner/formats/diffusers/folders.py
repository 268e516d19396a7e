"""Reading diffusers folders, and writing one model subfolder.

* :func:`load_diffusers_unet`: ``init_from=<pipeline folder or its unet/>`` -> our UNet state dict and what the
  pipeline folder says about it (schedule, scale factor, window);
* :func:`load_diffusers_vq`: ``first_stage.f4.ckpt_path=<folder>/vqvae`` -> our ``VQModel``, loaded strictly;
* :func:`write_model`: ``config.json`` + ``diffusion_pytorch_model.safetensors``, as ``save_pretrained`` writes them.

Weights are read from ``diffusion_pytorch_model.safetensors`` (or the ``.bin`` of older folders, through the safe
torch loader); ``refiner_chain.json`` (:data:`CHAIN_FILE`) is the manifest of a folder written by
:func:`refiner.formats.exports.export_diffusers`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from refiner.formats.diffusers import DiffusersFormatError
from refiner.formats.diffusers.config import schedule_from_scheduler_config, unet_from_diffusers, vq_from_diffusers
from refiner.formats.kinds import load_strict
from refiner.formats.safe_load import check_readable, safe_torch_load
from refiner.models.vq import VQModel, architecture_differences

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"
CHAIN_FILE = "refiner_chain.json"
CHAIN_FORMAT = "refiner-diffusers-chain"


def read_json(path: Path) -> dict:
    """A folder's JSON file (config.json, scheduler_config.json, refiner_chain.json); missing or invalid ->
    :class:`DiffusersFormatError`; unreadable -> ``permission denied: PATH``."""
    check_readable(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DiffusersFormatError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffusersFormatError(f"{path} is not valid JSON ({err})") from err


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The state dict of one model subfolder, as stored (diffusers names)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st, binf = folder / WEIGHTS_NAME, folder / WEIGHTS_NAME_BIN
    if st.is_file():
        check_readable(st)  # safetensors reports an unreadable file as "No such file or directory"
        try:
            return load_file(str(st))
        except (SafetensorError, OSError) as err:
            raise DiffusersFormatError(f"{st} is truncated or corrupt ({err})") from err
    if binf.is_file():
        return safe_torch_load(binf)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise DiffusersFormatError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} (found {present[:8]})")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_model(folder: Path, config: dict, state: Mapping[str, Tensor]) -> None:
    """One model subfolder: ``config.json`` and the weights as ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    write_json(folder / "config.json", config)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_NAME),
              metadata={"format": "pt"})


def resolve_unet_folder(path: str | os.PathLike) -> Path:
    """The ``UNet2DModel`` folder for ``path``: a model folder itself, or the ``unet/`` of a pipeline folder."""
    path = Path(path)
    if not path.is_dir():
        raise DiffusersFormatError(f"{path} is not a folder")
    for folder in (path, path / "unet"):
        cfg = folder / "config.json"
        if cfg.is_file():
            name = read_json(cfg).get("_class_name")
            if name not in (None, "UNet2DModel"):
                raise DiffusersFormatError(f"{cfg}: _class_name={name!r}; refiner reads UNet2DModel (an "
                                           "unconditional CompVis-layout UNet) only")
            return folder
    raise DiffusersFormatError(f"{path} is neither a diffusers UNet2DModel folder (config.json) nor a pipeline "
                               "folder with unet/config.json")


def load_diffusers_unet(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """``init_from`` for a diffusers folder (pipeline or ``unet/``): (our UNet state dict, info).

    ``info`` has ``unet_params`` (converted from config.json) and, when the pipeline folder says so,
    ``schedule``/``parameterization`` (scheduler/), ``scale_factor`` (vqvae/ config, only if it states one),
    and ``window`` (refiner_chain.json, for folders exported by refiner).
    """
    folder = resolve_unet_folder(path)
    state, params = unet_from_diffusers(read_weights(folder), read_json(folder / "config.json"), str(folder))
    info: dict[str, Any] = dict(kind="diffusers", source=str(path), used_ema=None, unet_params=params,
                                global_step=None, scale_factor=None)
    root = folder.parent  # the pipeline folder, whether path named it or its unet/
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        schedule, pred = schedule_from_scheduler_config(read_json(sched), str(sched))
        info.update(schedule=str(schedule), parameterization=pred)
    vq_cfg = root / "vqvae" / "config.json"
    if vq_cfg.is_file() and "scaling_factor" in read_json(vq_cfg):
        info["scale_factor"] = float(read_json(vq_cfg)["scaling_factor"])
    chain = root / CHAIN_FILE
    if chain.is_file():
        for e in read_json(chain).get("experts", []):
            if (root / e.get("subfolder", "")).resolve() == folder.resolve():
                info["window"] = f"[{e['t_min']}, {e['t_max']})"
    return state, info


def load_diffusers_vq(path: str | os.PathLike, expected_params: Mapping | None = None) -> VQModel:
    """Our ``VQModel`` from a diffusers ``VQModel`` folder (e.g. ``<pipeline>/vqvae``), loaded strictly.

    The folder's config.json decides the architecture; if ``expected_params`` (the config's
    ``first_stage.*.params``) disagree, a warning names the differences.
    """
    folder = Path(path)
    if (folder / "vqvae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vqvae"
    config = read_json(folder / "config.json")
    if config.get("_class_name") not in (None, "VQModel"):
        raise DiffusersFormatError(f"{folder / 'config.json'}: _class_name={config.get('_class_name')!r}, expected VQModel")
    state, params = vq_from_diffusers(read_weights(folder), config, str(folder))
    if expected_params:
        diffs = architecture_differences(expected_params, params)
        if diffs:
            log.warning("%s: its config.json differs from the configured first-stage params (%s); using the "
                        "folder's", folder, "; ".join(diffs))
    model = VQModel(**params)
    load_strict(model, state, str(folder))
    return model
