"""One typed configuration system for every entry point.

A config is a tree of dataclasses.  Each field is declared with :func:`param`,
which carries the field's documentation and its constraints, so that the same
declaration drives validation, ``--help`` output and the resolved YAML written
into every run directory::

    @dataclass
    class OptimConfig:
        lr: float = param(5e-5, "Peak learning rate.", gt=0)
        schedule: str = param("cosine", "Decay after warmup.", choices=("cosine", "linear"))

    cfg = load_config(OptimConfig, "run.yaml", ["lr=1e-4"])

Values come, in order of precedence, from the dataclass defaults, then YAML
files, then dotted ``key=value`` overrides (values parsed as YAML scalars, so
``lr=1e-4``, ``flag=true`` and ``names=[a,b]`` all work).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar, Union

import yaml

from reolm.io import write_text

__all__ = [
    "ConfigError",
    "param",
    "redefault",
    "Renamed",
    "load_saved_config",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "save_resolved",
    "describe",
    "validate",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def param(
    default: Any = MISSING,
    doc: str = "",
    *,
    default_factory: Any = MISSING,
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a config field with its documentation and constraints.

    ``choices`` restricts the value to a set; ``ge``/``gt``/``le``/``lt`` bound
    numbers (and the elements of numeric lists).
    """
    meta = {"doc": doc, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def redefault(cls: type, name: str, default: Any, doc: str | None = None) -> Any:
    """Field ``name`` of the section ``cls`` with another default, for a subclass.

    The documentation and constraints stay those of ``cls`` (or ``doc`` when a use needs its own
    words), so a setting shared by several sections is described once: fine-tuning's
    :class:`~reolm.optim.OptimConfig` has another learning rate than pre-training's, not another
    meaning."""
    meta = {f.name: f for f in dataclasses.fields(cls)}[name].metadata
    return param(default, meta["doc"] if doc is None else doc, choices=meta["choices"],
                 ge=meta["ge"], gt=meta["gt"], le=meta["le"], lt=meta["lt"])


@dataclass(frozen=True)
class Renamed:
    """A key a section no longer has: ``new`` is its name now (in the same section).

    A section lists its old keys in a ``renamed_keys`` class attribute (``{"max_len":
    Renamed("max_history_items")}``).  Config files and overrides that still use an old key are
    refused with a message naming the new one (and ``note``); records written by an older version
    (a run's saved ``config.yaml``, an export's model settings) are upgraded when read back, with
    ``convert`` turning an old value into the new key's value when the meaning shifted.
    """

    new: str
    note: str = ""
    convert: Callable[[Any], Any] | None = None


def _renamed_keys(cls: type) -> Mapping[str, Renamed]:
    return getattr(cls, "renamed_keys", {})


# ----------------------------------------------------------------------------- typing helpers

def _resolved_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} | None"
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        args = typing.get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML) to ``tp`` or raise a ConfigError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key}: must not be null (expected {_type_name(tp)})")
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (list, tuple, Sequence):
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        # inf passes a `gt=0` bound and nan fails no comparison loudly: every setting (rates,
        # weights, limits) is a real number, so neither is ever meant.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _check_constraints(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v not in choices:
                raise ConfigError(f"{key}: {v!r} is not one of {list(choices)}")
    numbers = value if isinstance(value, list) else [value]
    for v in numbers:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("ge") is not None and not v >= meta["ge"]:
            raise ConfigError(f"{key}: {v} must be >= {meta['ge']}")
        if meta.get("gt") is not None and not v > meta["gt"]:
            raise ConfigError(f"{key}: {v} must be > {meta['gt']}")
        if meta.get("le") is not None and not v <= meta["le"]:
            raise ConfigError(f"{key}: {v} must be <= {meta['le']}")
        if meta.get("lt") is not None and not v < meta["lt"]:
            raise ConfigError(f"{key}: {v} must be < {meta['lt']}")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    renamed = _renamed_keys(cls).get(key)
    if renamed is not None:
        note = f" ({renamed.note})" if renamed.note else ""
        return ConfigError(f"config key {prefix}{key} was renamed to {prefix}{renamed.new}{note}")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix}{key!s} in {cls.__name__}{hint} "
                       f"(known: {', '.join(names)})")


# ----------------------------------------------------------------------------- public API

def upgrade_renamed_keys(cls: type, data: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``data`` (a nested mapping for ``cls``) with every old key of :class:`Renamed` replaced by
    its new one, in every section; for records written by an older version, never for user input."""
    data = dict(data or {})
    for old, renamed in _renamed_keys(cls).items():
        if old not in data:
            continue
        if renamed.new in data:
            raise ConfigError(f"{prefix}{old} and {prefix}{renamed.new} are both set; {old} was renamed to "
                              f"{renamed.new}: keep only that")
        value = data.pop(old)
        data[renamed.new] = renamed.convert(value) if renamed.convert is not None else value
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        _, inner = _is_optional(hints[f.name])
        if dataclasses.is_dataclass(inner) and isinstance(data.get(f.name), Mapping):
            data[f.name] = upgrade_renamed_keys(inner, data[f.name], f"{prefix}{f.name}.")
    return data


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build ``cls`` from a (nested) mapping, validating every value.

    Old keys (:class:`Renamed`) are upgraded: a mapping given here is a record (an export's or a
    saved model's settings), while user input is checked by :func:`load_config` first."""
    data = upgrade_renamed_keys(cls, data, prefix)
    hints = _resolved_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise _unknown_key_error(cls, key, prefix)
    for name, f in known.items():
        if name in data:
            value = _coerce(data[name], hints[name], prefix + name)
            _check_constraints(value, f.metadata, prefix + name)
            kwargs[name] = value
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Check every field's constraints, then run ``obj.check()`` if it defines one.

    ``check()`` is where a section validates relations between its fields; it
    raises :class:`ConfigError` with a clear message.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, prefix + f.name + ".")
        else:
            _check_constraints(value, f.metadata, prefix + f.name)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (paths as strings) suitable for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> (["optim", "lr"], 1e-4); values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_nested(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _merge(base: dict[str, Any], update: Mapping[str, Any], cls: type | None = None) -> dict[str, Any]:
    """Merge ``update`` into ``base``: sections (nested dataclasses) key by key; any other value,
    a mapping-valued field such as ``downstream: {name: file}`` included, is replaced whole."""
    hints = _resolved_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    for k, v in update.items():
        section = _is_optional(hints[k])[1] if k in hints else None
        nested = section is not None and dataclasses.is_dataclass(section)
        if isinstance(v, Mapping) and isinstance(base.get(k), dict) and (cls is None or nested):
            _merge(base[k], v, section if nested else None)
        else:
            base[k] = v
    return base


def apply_overrides(obj: T, overrides: Iterable[str]) -> T:
    """Return a new config with dotted ``key=value`` overrides applied and validated."""
    tree = to_dict(obj)
    for text in overrides:
        path, value = parse_override(text)
        _check_keys(type(obj), _nest(path, value), "")
        _set_nested(tree, path, value)
    return from_dict(type(obj), tree)


def load_config(cls: type[T], files: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Defaults, then each YAML file in order, then ``key=value`` overrides."""
    if files is None:
        files = []
    elif isinstance(files, (str, os.PathLike)):
        files = [files]
    tree = to_dict(cls())
    for path in files:
        path = Path(path)
        loaded = _read_yaml_mapping(path)
        # Validate the file alone first so that an unknown key names the file.
        try:
            _check_keys(cls, loaded, "")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        _merge(tree, loaded, cls)
    for text in overrides:
        path_parts, value = parse_override(text)
        _check_keys(cls, _nest(path_parts, value), "")
        _set_nested(tree, path_parts, value)
    return from_dict(cls, tree)


def load_saved_config(cls: type[T], path: str | os.PathLike, overrides: Iterable[str] = ()) -> T:
    """A config saved by :func:`save_resolved` (possibly by an older version: old keys are
    upgraded), then ``key=value`` overrides (checked like :func:`load_config`'s)."""
    path = Path(path)
    loaded = upgrade_renamed_keys(cls, _read_yaml_mapping(path))
    try:
        _check_keys(cls, loaded, "")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return apply_overrides(from_dict(cls, _merge(to_dict(cls()), loaded, cls)), overrides)


def _read_yaml_mapping(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    return loaded


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    _set_nested(tree, path, value)
    return tree


def _check_keys(cls: type, data: Mapping[str, Any], prefix: str) -> None:
    hints = _resolved_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key_error(cls, key, prefix)
        _, inner = _is_optional(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
            _check_keys(inner, value, f"{prefix}{key}.")


def save_resolved(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config as YAML into ``run_dir`` (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text(run_dir / name, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Human-readable list of every key with type, default and documentation.

    ``defaults`` is the instance whose values are shown; nested sections show the value their
    parent's default factory builds (``reolm.model.top_routing`` is ``gate`` although
    ``ModelConfig`` alone says ``domain``)."""
    lines: list[str] = []
    hints = _resolved_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            doc = (inner.__doc__ or "").strip().splitlines()[0] if inner.__doc__ else ""
            lines.append(f"\n[{prefix}{f.name}] {doc}")
            lines.append(describe(inner, prefix + f.name + ".", getattr(defaults, f.name)))
            continue
        default = getattr(defaults, f.name)
        extra = ""
        if f.metadata.get("choices"):
            extra = f" one of {list(f.metadata['choices'])}."
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): "
                     f"{f.metadata.get('doc', '')}{extra}")
    return "\n".join(lines)


def config_help_epilog(cls: type) -> str:
    """The ``--help`` epilog listing every config key of ``cls``."""
    return ("configuration keys (set in --config YAML files or as key=value overrides):\n"
            + describe(cls))


__all__ += ["parse_override", "config_help_epilog", "dataclass"]
