"""Reading torch checkpoints safely: ``torch.load(weights_only=True)`` with clear errors (missing, unreadable,
corrupt, pickled code, plain pickles, old non-zip files), and telling a safetensors file by its content.

:class:`CheckpointError` is the error every loader in :mod:`refiner.formats` raises; :func:`check_readable` is how each
of them tells "you may not read this" (``permission denied: PATH``) from damage before reading.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from refiner.errors import SettingError


class CheckpointError(SettingError):
    """A checkpoint file is missing, corrupt, unsafe to unpickle, or not the kind that was expected."""


class _InertGlobal:
    """Stand-in for classes that old Lightning checkpoints reference only as callback-state keys.

    CompVis checkpoints (PL 1.x) key ``callbacks`` by the callback *class*; mapping those names to
    this empty class lets ``weights_only=True`` read them without importing or running anything.
    """


_INERT_GLOBAL_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.lr_monitor.LearningRateMonitor",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
)


def _allowed_data_globals() -> list:
    """numpy scalars/dtypes that old checkpoints store (e.g. a ``best_model_score``): data, not code."""
    import numpy as np

    out: list = [(_InertGlobal, name) for name in _INERT_GLOBAL_NAMES]
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    out += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    out += [type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8")]
    return out


def _unsafe_globals(path: Path, err: Exception) -> list[str]:
    """Names of the globals that made a ``weights_only`` load fail; empty if it failed for another reason."""
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            return []
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in _allowed_data_globals()}
        return [name for name in found if name not in allowed]
    # legacy (non-zip) format: only the error message names the global
    return re.findall(r"Unsupported global: GLOBAL (\S+)", str(err))


def check_readable(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` ``permission denied: PATH`` if ``path`` (a file or folder) exists but this
    process may not open it for reading (or may not reach it); anything else (missing, ...) is left to the caller.

    Every loader calls this before reading, so a file the user may not read is never reported as truncated or
    corrupt: the readers themselves blur the cause (``torch.load`` fails mid-way; safetensors reports an unreadable
    file as "No such file or directory"). It opens the path (non-blocking, so a FIFO cannot hang it) rather than ask
    ``os.access``, which answers for the real, not the effective, user and ignores what only ``open`` meets."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError as err:
        raise CheckpointError(f"permission denied: {path}") from err
    except OSError:
        pass


def safe_torch_load(path: str | os.PathLike, trust_checkpoint: bool = False, map_location="cpu") -> Any:
    """``torch.load`` that refuses pickled code unless ``trust_checkpoint=True``.

    Raises :class:`CheckpointError` for a missing file, a truncated/corrupt file, or a file that needs
    full unpickling (naming the offending globals and how to allow it).
    """
    path = Path(path)
    check_readable(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path, by_suffix=False):
        raise CheckpointError(f"{path} is a safetensors file (a refiner window export?), not a torch checkpoint; "
                              "pass it where windows are expected (experts=, init_from=), which read it by content")
    try:
        if trust_checkpoint:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(_allowed_data_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path, err)
        if unsafe:
            raise CheckpointError(
                f"{path}: refusing to unpickle arbitrary objects (it pickles {', '.join(unsafe[:5])}). Loading it "
                "runs code named in the file; if (and only if) you trust this file, pass trust_checkpoint=true "
                "to allow full unpickling."
            ) from err
        _raise_if_whole_pickle(path, err, trust_checkpoint)
        raise CheckpointError(f"{path} is truncated or corrupt ({str(err).splitlines()[0][:200]})") from err
    except PermissionError as err:  # made unreadable since check_readable
        raise CheckpointError(f"permission denied: {path}") from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError) as err:
        _raise_if_whole_pickle(path, err, trust_checkpoint)
        raise CheckpointError(f"{path} is truncated or corrupt ({type(err).__name__}: {str(err)[:200]})") from err


TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled value of a legacy (non-zip) torch.save file
LEGACY_HEADER_PICKLES = 4  # magic number, protocol version, sys_info, then the object itself


def _scan_pickles(path: Path, limit: int) -> tuple[int, Any]:
    """Parse (never execute) up to ``limit`` consecutive pickles at the start of ``path`` with ``pickletools``:
    returns how many are complete and the first value of the first one (its first argument-bearing opcode)."""
    import pickletools

    complete, first = 0, None
    try:
        with open(path, "rb") as f:
            while complete < limit:
                for op, arg, _ in pickletools.genops(f):
                    if complete == 0 and first is None and arg is not None and op.name not in ("PROTO", "FRAME"):
                        first = arg
                    if op.name == "STOP":
                        complete += 1
                        break
                else:
                    break
    except (ValueError, EOFError, OSError, UnicodeDecodeError):
        pass
    return complete, first


def _raise_if_whole_pickle(path: Path, err: Exception, trust_checkpoint: bool) -> None:
    """A non-zip file whose pickles are intact was refused, not cut short: say what it is instead of
    "truncated or corrupt". (A legacy torch file whose storage bytes are cut short still counts as corrupt.)"""
    if zipfile.is_zipfile(path):
        return
    complete, first = _scan_pickles(path, LEGACY_HEADER_PICKLES)
    unsupported = re.search(r"Unsupported (?:operand|global)[^\n]*", str(err))
    reason = unsupported.group(0) if unsupported else (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
    if first == TORCH_LEGACY_MAGIC:
        if complete == LEGACY_HEADER_PICKLES and isinstance(err, pickle.UnpicklingError) and not trust_checkpoint:
            raise CheckpointError(
                f"{path} is an old-format (non-zip) torch checkpoint that the safe loader refuses ({reason}): the "
                "refusal, not damage, stopped the load. Loading it needs full unpickling, which runs code named in the file: pass "
                "trust_checkpoint=true only if you trust it, or re-save it with a current torch.save") from err
        return
    if complete >= 1:
        raise CheckpointError(
            f"{path} is a plain Python pickle (pickle.dump), not a torch checkpoint ({reason}); "
            + ("torch.load cannot read it. " if trust_checkpoint else
               "refused as unsafe (unpickling it would run code named in the file), and torch.load could not read it "
               "even with trust_checkpoint=true. ")
            + "Re-save the weights with torch.save from code you trust") from err


def is_safetensors(path: Path, by_suffix: bool = True) -> bool:
    """By suffix (unless ``by_suffix=False``), or by content: 8-byte little-endian header length followed by
    a JSON ``{``."""
    if by_suffix and path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000

