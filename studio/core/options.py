"""Typed job configs: dataclasses whose fields carry their own help and limits, loaded from TOML and CLI flags.

A config class is a plain dataclass; each field says what it is next to it:

    @dataclass
    class GenerateConfig:
        steps: int = option(20, "denoising steps", min=1, max=500)

        def check(self) -> None:            # the one validation style: bounds first, then cross-field rules
            check_fields(self)

`add_config_args(parser, GenerateConfig)` turns the fields into CLI flags (--steps), and
`build_config(GenerateConfig, preset_values, steps=30)` merges defaults < preset TOML < flags < --set, then
calls the config's `check()`. There is one list of options (the dataclass), not a second hand-written
argparse list, and the limits a form shows are the ones the config enforces.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from studio.core.errors import ConfigError

T = TypeVar("T")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def option(default: Any, help_text: str, *, min: float | None = None, max: float | None = None,
           separator: str = ",") -> Any:  # fmt: skip
    """A dataclass field with its help text and optional bounds; lists get a fresh copy per instance.

    `separator` splits a list given as one string (e.g. "|" for prompts, which contain commas).
    """
    meta: dict[str, Any] = {"help": help_text, "separator": separator}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def limits(cls: type, name: str) -> tuple[float | None, float | None]:
    """(min, max) a field accepts (None where it has no bound), e.g. for a form's slider."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return meta.get("min"), meta.get("max")


def check_fields(config: Any) -> None:
    """Refuse a field outside its bounds or choices, with a message that names the limit."""
    cls = type(config)
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        _check_choices(cls, f, value)
        for item in value if isinstance(value, list) else [value]:  # a list's bounds hold for each value
            if item is None or isinstance(item, bool) or not isinstance(item, int | float):
                continue
            low, high = f.metadata.get("min"), f.metadata.get("max")
            if low is not None and item < low:
                raise ConfigError(f"option {f.name} must be at least {low:g}, got {item:g}")
            if high is not None and item > high:
                raise ConfigError(f"option {f.name} must be at most {high:g}, got {item:g}")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return _type_hints(cls)[f.name]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of an annotation such as `int | None` or `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str, False)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (args[0] if args else str), True
    if origin is typing.Literal:
        return type(typing.get_args(tp)[0]), False
    return tp, False


def _convert(value: Any, tp: Any, name: str, separator: str = ",") -> Any:
    base, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        if isinstance(value, (list, tuple)):
            items = value
        else:
            items = [v.strip() for v in str(value).split(separator) if v.strip()]
        return [_convert(v, base, name) for v in items]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if base in (int, float, str):
            return base(value)
        if base is Path:
            return Path(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"option {name}: cannot read {value!r} as {getattr(base, '__name__', base)}"
        ) from None
    return value


def _check_choices(cls: type, f: dataclasses.Field, value: Any) -> None:
    tp = _field_type(cls, f)
    literal = [a for a in [tp, *typing.get_args(tp)] if typing.get_origin(a) is typing.Literal]
    if literal and value is not None:
        choices = typing.get_args(literal[0])
        if value not in choices:
            raise ConfigError(f"option {f.name}: {value!r} is not one of {', '.join(map(str, choices))}")


def build_config(cls: type[T], values: Mapping[str, Any] | None = None, **overrides: Any) -> T:
    """Make a config from defaults, then `values` (a preset table), then keyword overrides, and check it.

    Unknown keys fail with the names that come close; the config's own `check()` runs last when it has one.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     steps: int = 20
    >>> build_config(C, {"steps": "30"}).steps
    30
    """
    merged: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    for source in (values or {}, overrides):
        for key, value in source.items():
            key = key.replace("-", "_")
            if key not in known:
                close = ", ".join(sorted(k for k in known if k[:3] == key[:3])) or ", ".join(sorted(known))
                raise ConfigError(f"unknown option {key!r} for {cls.__name__}; did you mean: {close}")
            if value is not None:
                separator = known[key].metadata.get("separator", ",")
                merged[key] = _convert(value, _field_type(cls, known[key]), key, separator)
    for key, value in merged.items():
        _check_choices(cls, known[key], value)
    config = cls(**merged)
    if callable(getattr(config, "check", None)):
        config.check()
    return config


def preset_names(kind: str) -> list[str]:
    """Names of the presets of one kind under presets/ ("train" -> dreambooth_sd15, style_sd15, ...)."""
    return sorted(p.stem.removeprefix(f"{kind}_") for p in PRESETS_DIR.glob(f"{kind}_*.toml"))


def find_preset(name: str | Path, kind: str | None = None) -> Path:
    """The preset file for a path or a name: presets/<name>.toml, or presets/<kind>_<name>.toml."""
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name).removesuffix(".toml")
    candidates = [PRESETS_DIR / f"{stem}.toml"]
    if kind:
        candidates.append(PRESETS_DIR / f"{kind}_{stem}.toml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
    raise ConfigError(f"no preset {str(name)!r}: give a .toml file or one of: {names}")


def load_preset(path_or_name: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read a TOML preset: a file path, or a name under presets/ ("train_style_sd15", or "style_sd15" with
    kind "train"). A preset may hold its fields at the top level or under a [kind] table."""
    path = find_preset(path_or_name, kind)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}).") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this preset ({exc.strerror or exc}).") from None
    if kind and isinstance(data.get(kind), dict):
        return dict(data[kind])
    return data


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """`--set key=value` pairs into a dict."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per dataclass field (help from field metadata); values default to None (= not given)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _field_type(cls, f)
        base, is_list = _base_type(tp)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "", []) and not isinstance(default, bool):
            help_text += f" (default: {default})"
        if base is bool and not is_list:
            parser.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text, metavar=f.name.upper())


def config_from_args(cls: type[T], args: argparse.Namespace, preset_kind: str | None = None) -> T:
    """Defaults < --preset TOML < flags < --set key=value."""
    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        values.update(load_preset(args.preset, preset_kind))
    names = {f.name for f in dataclasses.fields(cls)}
    flags = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(flags)
    values.update(parse_set_options(getattr(args, "set", None)))
    return build_config(cls, values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain TOML/JSON-friendly values (Paths as strings)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
