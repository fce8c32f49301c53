"""A run's configuration, strictly loaded: the schema's defaults (``schema.py``), then a
checkpoint's saved config, then YAML files, then ``key=value`` overrides from the command line
(OmegaConf dotlist syntax)::

    cfg = load_config(["configs/experiment/cifar10_demo.yaml"], ["optim.lr=0.1", "queue.size=8192"])

Loading is strict: an unknown key names the closest valid key, a value of the wrong type names
key and value, and an invalid value (``queue.size=0``) names the rule it breaks. All of these raise
:class:`~moco_engine.config.schema.ConfigError`. Also here: a config as a dict and as YAML and
back, and two saved configs compared by key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from moco_engine.config.schema import Config, ConfigError, valid_keys


def _unknown_key_message(full_key: str, source: str) -> str:
    close = difflib.get_close_matches(full_key, valid_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{full_key}' in {source}{hint}"


def _groups() -> dict[str, list[str]]:
    """Each group of settings (``optim``, ``track.wandb``, ...) and its keys."""
    out: dict[str, list[str]] = {}
    for key in valid_keys():
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), []).append(key)
    return out


def _check_groups(layer: Any, source: str, prefix: str = "") -> None:
    """A group given a plain value (``optim=5``) is named with its keys (OmegaConf would say
    "config key 'None'")."""
    groups = _groups()
    for key, value in (layer.items_ex(resolve=False) if isinstance(layer, DictConfig) else []):
        full = f"{prefix}{key}"
        if full in groups and not isinstance(value, DictConfig):
            keys = groups[full]
            raise ConfigError(f"config key '{full}' in {source} is a group of settings, not a value: set one of its "
                              f"keys ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        if isinstance(value, DictConfig):
            _check_groups(value, source, full + ".")


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    """Merge one layer into the structured config, turning OmegaConf's errors into one line."""
    _check_groups(layer, source)
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(str(e.full_key or e.key), source)) from None
    except ValidationError as e:
        value = OmegaConf.select(layer, str(e.full_key), default=getattr(e, "value", "?"))
        expected = type(OmegaConf.select(base, str(e.full_key))).__name__
        raise ConfigError(
            f"config key '{e.full_key}' in {source}: value {value!r} is not a valid {expected}"
        ) from None
    except OmegaConfBaseException as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"invalid config in {source}: {first}") from None


def _read_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(p)
    except Exception as e:  # yaml.YAMLError and friends: report the file, the line and the problem
        raise ConfigError(f"cannot parse config file {yaml_problem(e, path)}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not a list")
    return layer


def yaml_problem(e: BaseException, path: str | Path) -> str:
    """``<file>, line N: <problem>`` of a YAML error (a duplicate key, bad indentation, ...)."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:
        return f"{path}, line {mark.line + 1}: {problem}"
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"{path}: {first}"


def _parse_dotlist(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)}: {first}") from None


def split_args(words: list[str] | tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """A command line's config files (``*.yaml``/``*.yml``, no ``=``), its ``key=value``
    overrides, and its other words (``-m``, ``${args}``, a typo), each in the given order: how
    ``moco-train`` reads its arguments and ``moco-sweep`` a sweep's command."""
    files = [w for w in words if w.endswith((".yaml", ".yml")) and "=" not in w]
    overrides = [w for w in words if "=" in w and not w.startswith(("${", "-")) and w not in files]
    return files, overrides, [w for w in words if w not in files and w not in overrides]


def differing_values(saved: dict[str, Any], now: dict[str, Any], keys: Any) -> list[str]:
    """``key a (checkpoint) vs b (config)`` for every dotted key of ``keys`` whose value differs
    between a saved config dict and this one (keys ``saved`` predates are left out)."""
    missing = object()

    def get(d: Any, key: str) -> Any:
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return missing
            d = d[part]
        return d

    out = []
    for key in keys:
        a, b = get(saved, key), get(now, key)
        if a is not missing and a != b:
            out.append(f"{key} {a!r} (checkpoint) vs {b!r} (config)")
    return out


def load_config(
    yaml_files: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the run's :class:`Config`: defaults, then ``base`` (a checkpoint's saved config), then
    each YAML file in order, then overrides.

    Raises:
        ConfigError: an unknown key, a wrong type, an unreadable file or an invalid value.
    """
    merged = OmegaConf.structured(Config)
    if base is not None:
        merged = _merge(merged, OmegaConf.create(base), "the checkpoint's config")
    for path in yaml_files:
        merged = _merge(merged, _read_yaml(path), path)
    if overrides:
        merged = _merge(merged, _parse_dotlist(list(overrides)), "the command-line overrides")
    try:
        cfg = OmegaConf.to_object(merged)
    except InterpolationResolutionError as e:
        cause = str(e).splitlines()[0]
        env = re.search(r"Environment variable '([^']+)' not found", cause)
        what = f"environment variable {env[1]} is not set" if env else cause
        raise ConfigError(f"config key '{e.full_key}': {what}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {str(e).splitlines()[0]}") from None
    assert isinstance(cfg, Config)
    from moco_engine.config.rules import (
        validate,  # rules.py reads the schema from here: imported when first needed
    )

    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the run folder and read back by :func:`from_dict`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain Python containers (stored inside every checkpoint)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(out, dict)
    return out


def from_dict(data: dict[str, Any], source: str = "a checkpoint") -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict`'s output, strictly."""
    cfg = OmegaConf.to_object(_merge(OmegaConf.structured(Config), OmegaConf.create(data), source))
    assert isinstance(cfg, Config)
    return cfg
