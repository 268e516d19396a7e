"""Checks of setting values (each raises :class:`~refiner.errors.SettingError` with a one-line message naming the
setting, the value and what is expected), and the typed-settings boundary: :func:`from_config` builds a settings
dataclass from an app's plain config, once."""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import tempfile
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from refiner.errors import SettingError


def require_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]`` (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SettingError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingError(f"{name} must be in [{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}], got {value}")
    return value


def require_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float within ``[minimum, maximum]``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingError(f"{name} must be in [{minimum if minimum is not None else '-inf'}, "
                           f"{maximum if maximum is not None else 'inf'}], got {value}")
    return float(value)


def require_bool(name: str, value: Any) -> bool:
    """``value`` itself, when it is a bool (``true``/``false`` in YAML; 0, 1 and strings are refused)."""
    if not isinstance(value, bool):
        raise SettingError(f"{name} must be true or false, got {value!r}")
    return value


def require_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise SettingError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_device(value: Any, name: str = "device"):
    """A ``torch.device`` that exists on this machine (``cpu``, ``cuda[:i]`` with CUDA, ``mps`` with MPS)."""
    import torch

    try:
        device = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError) as err:
        raise SettingError(f"{name}={value!r} is not a torch device (expected cpu, cuda, cuda:N or mps)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"{name}={value!r} but CUDA is not available on this machine (torch "
                               f"{torch.__version__}); use {name}=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError(f"{name}={value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"{name}={value!r} but MPS is not available on this machine; use {name}=cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise SettingError(f"{name}={value!r}: refiner runs on cpu, cuda or mps")
    return device


def check_writable_dir(path: str | os.PathLike, name: str = "output_dir") -> Path:
    """A folder that is, or can be created, and is writable; checked without creating it.

    An existing folder is probed by creating and removing a temporary file in it (so a read-only mount or
    missing rights are found even for root); for a folder still to be created, its nearest existing
    ancestor must be a writable folder.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SettingError(f"{name} {path} is an existing file, not a folder")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise SettingError(f"{name} {path}: {ancestor} is a file, not a folder")
    if ancestor == path:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise SettingError(f"{name} {path} is not writable ({err.strerror or err})") from err
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        raise SettingError(f"{name} {path} cannot be created: {ancestor} is not writable")
    return path


# ---------------------------------------------------------------------------------- typed settings
T = TypeVar("T")


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass a type hint names (``X``, ``X | None``, ``Optional[X]``), or None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple or any(
        typing.get_origin(a) is tuple for a in typing.get_args(hint))


def unknown_key_error(where: str, key: str, valid: Sequence[str]) -> SettingError:
    """The one-line error for a key that is not a setting, naming the closest valid one when there is one."""
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    hint = f"; did you mean {where}{close[0]}?" if close else f"; the settings here are {', '.join(sorted(valid))}"
    return SettingError(f"unknown setting {where}{key}{hint}")


def _collection_of_settings(hint: Any) -> tuple[str, type] | None:
    """``("tuple", X)`` for ``tuple[X, ...]`` and ``("mapping", X)`` for ``Mapping[str, X]`` (also inside ``| None``)
    when ``X`` is a dataclass; else None."""
    for h in (hint, *typing.get_args(hint)):
        origin, args = typing.get_origin(h), typing.get_args(h)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis and _dataclass_type(args[0]) is args[0]:
            return "tuple", args[0]
        if origin in (Mapping, dict, collections.abc.Mapping) and len(args) == 2 and \
                _dataclass_type(args[1]) is args[1]:
            return "mapping", args[1]
    return None


def _entry(cls: type[T], value: Any, where: str) -> T:
    """One entry of a collection of settings (``where`` names it: ``points[0]``, ``methods.chain``), built as
    :func:`from_config` builds a block. An error from the checks of the entry or of a block inside it (their
    ``__post_init__``) is prefixed with ``where``: the entry cannot know its place."""
    if isinstance(value, cls):
        return value
    try:
        return cls(**_field_values(cls, {} if value is None else value, f"{where}."))
    except TypeError as err:
        raise SettingError(f"{where}: {err}") from err
    except SettingError as err:
        if where in str(err):  # it names its place already (an unknown key, a nested collection)
            raise
        raise type(err)(f"{where}: {err}") from err


def _convert(hint: Any, value: Any, where: str) -> Any:
    """A config value as the field ``hint`` wants it: nested settings built, lists as tuples."""
    collection = _collection_of_settings(hint)
    if collection is not None:
        kind, cls = collection
        if value is None:
            return None  # (the class's own check says whether None is allowed)
        if kind == "tuple":
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
                raise SettingError(f"{where} must be a list of settings, got {value!r}")
            return tuple(_entry(cls, v, f"{where}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, Mapping):
            raise SettingError(f"{where} must be a mapping of name -> settings, got {value!r}")
        return {str(k): _entry(cls, v, f"{where}.{k}") for k, v in value.items()}
    nested = _dataclass_type(hint)
    if nested is not None and not isinstance(value, nested) and not (
            value is None and type(None) in typing.get_args(hint)):
        return from_config(nested, value, f"{where}.")
    if isinstance(value, list) and _is_tuple(hint):
        return tuple(value)
    return value


def _field_values(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The keyword arguments of ``cls`` from the mapping ``data``: unknown keys refused, nested settings built."""
    if not isinstance(data, Mapping):
        raise SettingError(f"{where.rstrip('.') or cls.__name__} must be a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise unknown_key_error(where, key, names)
        values[key] = _convert(hints.get(key), value, f"{where}{key}")
    return values


def from_config(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """A settings dataclass ``cls`` from a plain mapping (an app's resolved config block, or a dict).

    Nested dataclass fields are built from nested mappings, lists become tuples where the field is a tuple, and
    missing keys take the field's default. A field typed ``tuple[X, ...]`` or ``Mapping[str, X]`` with a dataclass
    ``X`` takes a list or a mapping of such blocks, each built the same way and named in errors by its place
    (``points[0].region``, ``methods.chain``). A key that is not a field is a :class:`SettingError` naming the
    closest field (``where`` prefixes the names, e.g. ``"tiling."``); the dataclass's own ``__post_init__`` checks
    the values. Written here rather than with Hydra's structured configs so that the library never imports Hydra,
    and so that every problem is one line."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    values = _field_values(cls, data, where)
    try:
        return cls(**values)
    except TypeError as err:
        raise SettingError(f"{where.rstrip('.') or cls.__name__}: {err}") from err


OPTIONAL = "optional"  # dataclasses.field metadata key: see :func:`optional`


def optional(default: Any = None) -> Any:
    """A dataclass field for a setting that may be left out of the config (``None``: unset). Records
    (:func:`to_plain`) leave it out while it is unset, as the config did, so a record or digest of settings that never
    name it stays what it was before the setting existed."""
    return dataclasses.field(default=default, metadata={OPTIONAL: True})


def to_plain(settings: Any) -> Any:
    """Settings as plain dicts and lists (dataclasses, tuples and any mapping or sequence, config containers
    included): for digests, records, JSON and checkpoint hyperparameters that load with ``weights_only=True``. Fields
    made with :func:`optional` are left out while they are None."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        return {f.name: to_plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)
                if not (f.metadata.get(OPTIONAL) and getattr(settings, f.name) is None)}
    if isinstance(settings, Mapping):
        return {k: to_plain(v) for k, v in settings.items()}
    if isinstance(settings, Sequence) and not isinstance(settings, (str, bytes)):
        return [to_plain(v) for v in settings]
    return settings
