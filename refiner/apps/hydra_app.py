"""What every Hydra command shares: deprecated spellings, one-line errors for overrides that cannot compose, and the
conversion of the composed config into typed settings (the one place the library's settings meet Hydra).

:func:`hydra_command` wraps a task like ``hydra.main`` does, and first:

1. rewrites deprecated override spellings (``stages=`` -> ``experts=``, ``mode=sample`` -> ``mode=refine``), printing
   one ``deprecated:`` line naming the new spelling;
2. composes the config once with Hydra's compose API, so that an override Hydra cannot apply (an unknown key, an
   unknown preset or experiment) is one ``error:`` line and exit 2 (:mod:`refiner.cli`) instead of Hydra's multi-line
   report and exit 1. Sweeps (``-m``) are left to Hydra;
3. checks that Hydra's run dir can be created, else moves it to the command's output folder or stops with one
   ``error: permission denied: ...`` line (:mod:`refiner.apps.run_dir`).

:func:`settings_from` turns the composed ``DictConfig`` into a settings dataclass with
:func:`refiner.settings.from_config`, leaving out the keys that only feed interpolations (``paths``, ``task_name``).
"""

from __future__ import annotations

import contextlib
import difflib
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from refiner.apps import CONFIG_DIR
from refiner.apps.run_dir import NO_RUN_FLAGS, run_dir_overrides
from refiner.cli import report
from refiner.errors import SettingError
from refiner.settings import from_config

T = TypeVar("T")

PLUMBING = ("paths", "task_name")  # keys that only feed interpolations
# Hydra flags that take a value (the next argument)
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}


def rewrite_deprecated(argv: Sequence[str], aliases: Mapping[str, str]) -> list[str]:
    """``argv`` with deprecated override keys (and ``key=value`` pairs) replaced by their new spelling; one line on
    stderr per replacement. ``aliases`` maps an old key (``stages``) or an old ``key=value`` (``mode=sample``) to the
    new one."""
    out = []
    for arg in argv:
        new = arg
        prefix = next((p for p in ("++", "+", "~") if arg.startswith(p)), "")
        body = arg[len(prefix):]
        key, sep, value = body.partition("=")
        if sep and f"{key}={value}" in aliases:
            new = prefix + aliases[f"{key}={value}"]
        elif key in aliases or key.split(".")[0] in aliases:
            head, _, rest = key.partition(".")
            new_key = aliases[key] if key in aliases else aliases[head] + (f".{rest}" if rest else "")
            new = f"{prefix}{new_key}{sep}{value}"
        if new != arg:
            print(f"deprecated: {arg.split('=')[0] if '=' not in new else arg} is now {new}", file=sys.stderr)
        out.append(new)
    return out


def overrides_of(argv: Sequence[str]) -> list[str] | None:
    """The ``key=value`` overrides in a command line, or None when Hydra should handle it alone (sweeps, other
    config sources, shell completion)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun", "--shell-completion", "-sc") or arg.startswith(("--config-", "-cp", "-cn",
                                                                                        "-cd")):
            return None
        if arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def _options(group: str) -> list[str]:
    folder = Path(CONFIG_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def nearest_keys(key: str, valid: Sequence[str]) -> list[str]:
    """The valid keys to suggest for an unknown ``key``: difflib's closest (a misspelling, ``t_strat`` ->
    ``t_start``), else the (at most two) keys sharing a word with it, closest first (``lr_typo`` -> ``base_lr``,
    ``scale_lr``: difflib alone scores ``grid_steps`` higher for a short key)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close
    words = {w for w in re.split(r"[_.]", key.lower()) if w}
    sharing = [k for k in valid if words & set(k.lower().split("_"))]
    return sorted(sharing, key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())[:2]


def composition_error(err: Exception, config_name: str, overrides: Sequence[str]) -> SettingError:
    """Hydra's composition failure as one line: the unknown key with the nearest valid one, or the unknown option of
    a config group with the options there are."""
    if isinstance(err, MissingConfigException) and getattr(err, "missing_cfg_file", None):
        group, _, name = str(err.missing_cfg_file).rpartition("/")
        options = _options(group)
        if options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            return SettingError(f"unknown {group} {name!r}{hint}; choose one of: {', '.join(options)}")
    cause = err.__cause__ if err.__cause__ is not None else err
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and full_key and "not in struct" in str(cause):
        parent, _, key = str(full_key).rpartition(".")
        try:
            base = compose(config_name, overrides=[o for o in overrides if not o.lstrip("+~").startswith(
                f"{full_key}=")])
            node = OmegaConf.select(base, parent) if parent else base
            valid = list(node.keys()) if isinstance(node, DictConfig) else []
        except HydraException:
            valid = []
        close = nearest_keys(key, [str(k) for k in valid if not str(k).startswith("_")])
        where = f"{parent}." if parent else ""
        hint = f"; did you mean {' or '.join(where + k for k in close)}?" if close else ""
        return SettingError(f"unknown setting {full_key}{hint} (add a new key with +{full_key}=...)")
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return SettingError(f"cannot compose the {config_name} config: {text}")


def check_composes(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """Compose ``config_name`` with ``overrides`` as Hydra will (with its ``hydra`` node) and return it; raise a
    one-line :class:`SettingError` if it fails. Inside a running Hydra app (``refiner chain`` checking its steps'
    command lines) the app's config search path, which is ``conf/`` too, is used."""
    running = GlobalHydra.instance().is_initialized()
    with contextlib.nullcontext() if running else initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        try:
            return compose(config_name, overrides=list(overrides), return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise composition_error(err, config_name, overrides) from None


def hydra_command(config_name: str, task: Callable[[DictConfig], Any],
                  aliases: Mapping[str, str] | None = None, output_key: str | None = "output_dir") -> Callable[[], Any]:
    """``hydra.main`` for ``task`` over ``conf/<config_name>.yaml``, with the checks in the module docstring.
    ``output_key``: the command's output folder, where Hydra's run dir goes when the configured one cannot be
    created (:mod:`refiner.apps.run_dir`); None when the command has none."""
    main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)

    def command() -> Any:
        argv = rewrite_deprecated(sys.argv[1:], aliases or {})
        overrides = overrides_of(argv)
        if overrides is not None:
            try:
                cfg = check_composes(config_name, overrides)
                if not NO_RUN_FLAGS & set(argv):
                    fallback = run_dir_overrides(cfg, output_key)
                    if fallback:
                        argv = [a for a in argv if not a.startswith("hydra.run.dir=")] + fallback
            except SettingError as err:
                report(err)
                raise SystemExit(2) from None
        sys.argv = [sys.argv[0], *argv]
        return main()

    return command


def settings_from(cls: type[T], cfg: DictConfig, drop: Sequence[str] = PLUMBING) -> T:
    """The typed settings of a composed config (its interpolations resolved, plumbing keys left out)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in drop:
        plain.pop(key, None)
    return from_config(cls, plain)


def resolved(block: Any) -> Any:
    """A config block as plain, resolved containers (``OmegaConf.to_container(block, resolve=True)``; None stays
    None): what an app hands to the library, which never sees a ``DictConfig`` (e.g. a ``first_stage.<name>`` block
    for :func:`refiner.formats.first_stage.first_stage_from_mapping`)."""
    return None if block is None else OmegaConf.to_container(block, resolve=True)
