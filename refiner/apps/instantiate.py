"""Build objects from config blocks (``hydra.utils.instantiate``) under the CLI contract: a value the target cannot
take is one ``error:`` line naming the key, and exit 2 (:mod:`refiner.cli`), not Hydra's multi-line
``InstantiationException`` and exit 1.

Two kinds of rejection are turned into a :class:`~refiner.errors.SettingError`:

1. before the call, :func:`check_block` compares the block's keys and scalar values with the target's signature: a key
   the target has no parameter for (``+trainer.max_step=5``) names the nearest parameter, and a value of the wrong
   type (``trainer.max_steps=abc`` for ``max_steps: int``) names the key and the type. Only annotations that can be
   judged exactly (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``Optional``/unions of these) are checked;
   anything else (classes, containers, callables) is left to the target;
2. during the call, what the target raises to reject a value: a ``ValueError`` (our settings checks raise
   :class:`~refiner.errors.SettingError`, a ``ValueError``) or Lightning's ``MisconfigurationException``
   (``trainer.max_steps=-5``, ``trainer.accelerator=gpu`` without CUDA). Other exceptions are bugs and keep their
   traceback.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Literal, Union

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from refiner.errors import SettingError

_SCALARS = (bool, int, float, str)


def _rejection_types() -> tuple[type[BaseException], ...]:
    try:
        from lightning_fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # Lightning is not installed: only ValueError
        return (ValueError,)
    return (ValueError, MisconfigurationException)


def accepts(annotation: Any, value: Any) -> bool | None:
    """Whether a scalar ``value`` fits ``annotation``: True/False when the annotation can be judged, None when not
    (then the target decides)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in typing.get_args(annotation))
    if origin is Union or isinstance(annotation, types.UnionType):
        verdicts = [accepts(arg, value) for arg in typing.get_args(annotation)]
        return True if any(verdicts) else (None if None in verdicts else False)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


def _type_name(annotation: Any) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _signature(target: Any) -> inspect.Signature | None:
    for eval_str in (True, False):  # annotations naming TYPE_CHECKING-only imports cannot be evaluated
        try:
            return inspect.signature(target, eval_str=eval_str)
        except (NameError, TypeError, ValueError):
            continue
    return None


def check_block(block: Any, key: str) -> None:
    """Check a config block with a ``_target_`` (and its nested ``_target_`` blocks) against the target's signature;
    raise a one-line :class:`SettingError` naming ``key.<name>`` on an unknown key or a wrong scalar type."""
    if not isinstance(block, (DictConfig, dict)) or "_target_" not in block:
        return
    try:
        target = hydra.utils.get_object(str(block["_target_"]))
    except Exception as err:  # noqa: BLE001 - Hydra raises plain exceptions for a target it cannot import
        raise SettingError(f"{key}._target_={block['_target_']!r} cannot be imported: {err}") from None
    signature = _signature(target)
    if signature is None:
        return
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                           inspect.Parameter.VAR_KEYWORD)]
    for name in block:
        name = str(name)
        if name.startswith("_") and name.endswith("_"):  # _target_, _partial_, _convert_, _recursive_, _args_
            continue
        value = block[name] if not isinstance(block, DictConfig) else OmegaConf.select(block, name)
        if name not in params:
            if takes_any:
                continue
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {key}.{close[0]}?" if close else ""
            raise SettingError(f"unknown setting {key}.{name}: {block['_target_']} takes no {name!r}{hint}")
        if isinstance(value, (DictConfig, dict)):
            check_block(value, f"{key}.{name}")
        elif value is None or isinstance(value, _SCALARS):
            if accepts(params[name].annotation, value) is False:
                raise SettingError(f"{key}.{name}={value!r} is not a valid value: expected "
                                   f"{_type_name(params[name].annotation)}")


def instantiate(block: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(block, **kwargs)`` for the config block at ``key`` (``trainer``, ``data``), with the
    checks of the module docstring: a value the target rejects is a :class:`SettingError` naming ``key``."""
    check_block(block, key)
    try:
        return hydra.utils.instantiate(block, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, _rejection_types()):
            message = " ".join(str(cause).split()) or type(cause).__name__
            raise SettingError(f"{key}: {message}") from cause
        raise
