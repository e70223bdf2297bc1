"""Settings from the config file (TOML) and from flags, both derived from Config's fields.

Every Config field carries its help in its metadata (shim.config.about); its name, type
and default are the field's own. From these one table of `Spec`s is made, and from it:
the flags of `pyshim serve`, the keys the file accepts, and the TOML `config dump` writes.
Precedence: Config's defaults < the file < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

from shim import validate
from shim.config import DEFAULT_CONFIG_FILE, Config, Setting
from shim.errors import InvalidArgument

_HANDLER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


class ConfigError(InvalidArgument):
    """A config file or a setting's value is wrong; the message names the file, key or flag."""


# ---- kinds: how one type of value is read and written ------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """How values of one Config field type come from a flag and from TOML, and go back to TOML."""

    expected: str  # for errors: what a TOML value must be
    flag_type: Callable[[str], Any]  # argparse's conversion of one flag argument
    from_toml: Callable[[object, str, Path], Any]  # (value, where, the file's dir) -> field value
    from_flag: Callable[[Any], Any]  # argparse's result -> field value
    to_toml: Callable[[Any], str]
    repeatable: bool = False


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a float", list: "an array"}
    name = names.get(type(value)) or ("a table" if isinstance(value, dict) else "a date or time")
    shown = repr(value)
    return f"{name} ({shown if len(shown) <= 60 else shown[:57] + '...'})"


def _wrong(where: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{where} must be {expected}, not {_toml_type(value)}")


def _string(value: object, where: str, expected: str = "a string") -> str:
    if not isinstance(value, str):
        raise _wrong(where, expected, value)
    return value


def _path(value: object, where: str, base: Path) -> Path:
    # Relative paths in a file are the file's neighbours: the daemon's cwd (/ under systemd)
    # must not change what a file means.
    text = _string(value, where, "a string (a path)")
    if not text:
        raise ConfigError(f"{where} must be a path, not an empty string")
    return base / text


def _int(value: object, where: str, base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int to Python, not to TOML
        raise _wrong(where, "an integer", value)
    return value


def _float(value: object, where: str, base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong(where, "a number", value)
    return float(value)


def _bool(value: object, where: str, base: Path) -> bool:
    if not isinstance(value, bool):
        raise _wrong(where, "a boolean (true or false)", value)
    return value


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _wrong(where, "an array", value)
    return value


def _handler_flag(value: str) -> tuple[str, str]:
    name, _, program = value.partition("=")
    return name, program or name


def _handlers_from_toml(value: object, where: str, base: Path) -> tuple[tuple[str, str], ...]:
    # An array of tables, not a table of names: a TOML table has no order, and the first
    # handler is the default one.
    pairs = []
    for index, item in enumerate(_list(value, where)):
        at = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise _wrong(at, 'a table ({ name = "...", program = "..." })', item)
        _no_unknown_keys(item, ("name", "program"), f"{at}.")
        if "name" not in item:
            raise ConfigError(f"{at} has no name")
        name = _string(item["name"], f"{at}.name")
        pairs.append((name, _string(item.get("program", name), f"{at}.program") or name))
    return tuple(pairs)


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char < " " or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        elif "\ud800" <= char <= "\udfff":  # a byte no encoding decoded (surrogateescape)
            raise ValueError(f"{text!r} is not valid Unicode, which TOML needs")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _array(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _handlers_to_toml(pairs: tuple[tuple[str, str], ...]) -> str:
    return _array(
        [f"{{ name = {toml_string(name)}, program = {toml_string(program)} }}" for name, program in pairs]
    )


def _same(value: Any) -> Any:
    return value


_STR = Kind("a string", str, lambda v, where, _: _string(v, where), _same, toml_string)
_PATH = Kind(
    "a string (a path)",
    Path,
    _path,
    lambda p: p.absolute() if p is not None else None,
    lambda p: toml_string(str(p)),
)
_KINDS: dict[object, Kind] = {
    str: _STR,
    Path: _PATH,
    Path | None: _PATH,
    int: Kind("an integer", int, _int, _same, str),
    float: Kind("a number", float, _float, _same, repr),
    bool: Kind("a boolean", str, _bool, _same, lambda b: "true" if b else "false"),
    tuple[str, ...]: Kind(
        "an array of strings",
        str,
        lambda v, where, _: tuple(_string(x, f"{where}[{i}]") for i, x in enumerate(_list(v, where))),
        tuple,
        lambda items: _array([toml_string(x) for x in items]),
        repeatable=True,
    ),
    tuple[Path, ...]: Kind(
        "an array of strings (paths)",
        Path,
        lambda v, where, base: tuple(_path(x, f"{where}[{i}]", base) for i, x in enumerate(_list(v, where))),
        lambda paths: tuple(p.absolute() for p in paths),
        lambda items: _array([toml_string(str(x)) for x in items]),
        repeatable=True,
    ),
    tuple[tuple[str, str], ...]: Kind(
        "an array of tables",
        _handler_flag,
        _handlers_from_toml,
        tuple,
        _handlers_to_toml,
        repeatable=True,
    ),
}


# ---- the settings: one Spec per Config field -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    name: str  # the Config field
    key: str  # in the file
    flag: str  # on the command line
    default: Any
    setting: Setting
    kind: Kind


def _specs() -> tuple[Spec, ...]:
    hints = get_type_hints(Config)
    specs = []
    for f in dataclasses.fields(Config):
        setting: Setting = f.metadata["setting"]  # a field without one fails here, at import
        key = setting.key or f.name
        kind = _KINDS[hints[f.name]]
        specs.append(
            Spec(f.name, key, setting.flag or "--" + key.replace("_", "-"), f.default, setting, kind)
        )
    return tuple(specs)


SPECS = _specs()
_BY_KEY = {spec.key: spec for spec in SPECS}


def shown_default(spec: Spec) -> str:
    """The default as help and docs show it."""
    value = spec.default
    if value is None or value in ("", ()):
        return spec.setting.unset or "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if spec.kind.to_toml is _handlers_to_toml:
        return ", ".join(f"{name}={program}" for name, program in value)
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return str(value)


def _check(spec: Spec, value: Any, where: str) -> Any:
    """The rules a value obeys wherever it came from; returns it normalised."""
    how = spec.setting
    if how.choices and value not in how.choices:
        raise ConfigError(f"{where} must be one of {', '.join(how.choices)}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, not {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool) and not _within(how, value):
        bounds = f"at least {how.low:g}" if how.high is None else f"from {how.low:g} to {how.high:g}"
        raise ConfigError(f"{where} must be {bounds}, not {value!r}")
    if how.kind == "cgroup":
        try:
            return validate.cgroup_path(value, where) or spec.default
        except InvalidArgument as exc:
            raise ConfigError(str(exc)) from None
    if spec.kind.to_toml is _handlers_to_toml:
        _check_handlers(value, where)
    return value


def _within(how: Setting, value: float) -> bool:
    return (how.low is None or value >= how.low) and (how.high is None or value <= how.high)


def _check_handlers(pairs: tuple[tuple[str, str], ...], where: str) -> None:
    if not pairs:
        raise ConfigError(f"{where} must name at least one runtime handler")
    names = [name for name, _ in pairs]
    for name in names:
        if not _HANDLER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: handler name {name!r} must be a lowercase DNS label")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a handler is named twice ({', '.join(names)})")


# ---- the file --------------------------------------------------------------------------------


def _no_unknown_keys(table: Mapping[str, object], known: tuple[str, ...], prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            raise ConfigError(f"unknown key {json.dumps(prefix + key)}{hint}")


def read_file(path: Path) -> dict[str, Any]:
    """The settings a config file sets, as Config field values; ConfigError names what is wrong."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    try:
        return from_table(table, path.absolute().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_table(table: Mapping[str, object], base: Path) -> dict[str, Any]:
    """A parsed config file's settings, as Config field values; relative paths join `base`."""
    _no_unknown_keys(table, tuple(_BY_KEY), "")
    values = {}
    for key, raw in table.items():
        spec = _BY_KEY[key]
        values[spec.name] = _check(spec, spec.kind.from_toml(raw, key, base), key)
    return values


def file_to_read(named: Path | None) -> Path | None:
    """The file a command reads: the one --config names (it must exist), else the default one
    when it is there (a dangling link there is an error, not silence)."""
    if named is not None:
        if not os.path.lexists(named):
            raise ConfigError(f"--config {named}: no such file")
        return named
    return DEFAULT_CONFIG_FILE if os.path.lexists(DEFAULT_CONFIG_FILE) else None


# ---- flags -------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting, plus --config. Flags not given leave no attribute
    (default SUPPRESS): that is how a flag given is told from a default."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML file of settings, which flags override (default: {DEFAULT_CONFIG_FILE} if present)",
    )
    for spec in SPECS:
        text = f"{spec.setting.help} (default: {shown_default(spec)})".replace("%", "%%")
        how: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": text}
        if spec.kind.from_toml is _bool:
            parser.add_argument(spec.flag, action=argparse.BooleanOptionalAction, **how)
            continue
        how.update(type=spec.kind.flag_type, metavar=spec.setting.metavar)
        if spec.setting.choices:
            how["choices"] = spec.setting.choices
        if spec.kind.repeatable:
            how["action"] = "append"
        parser.add_argument(spec.flag, **how)


def from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, as Config field values."""
    given = vars(args)
    return {
        spec.name: _check(spec, spec.kind.from_flag(given[spec.name]), spec.flag)
        for spec in SPECS
        if spec.name in given
    }


def effective(args: argparse.Namespace) -> Config:
    """Config's defaults, overridden by the file's settings, overridden by the flags given."""
    path = file_to_read(args.config)
    values = read_file(path) if path is not None else {}
    values.update(from_flags(args))
    return Config(**values)


# ---- dump ------------------------------------------------------------------------------------


def dump(config: Config) -> str:
    """`config` as a TOML file that reads back as the same Config."""
    lines = []
    for spec in SPECS:
        value = getattr(config, spec.name)
        if value is None:  # TOML has no null: an absent key is the default, None
            lines.append(f"# {spec.key}: unset ({spec.setting.unset})")
            continue
        try:
            lines.append(f"{spec.key} = {spec.kind.to_toml(value)}")
        except ValueError as exc:
            raise ConfigError(f"{spec.key}: {exc}") from None
    return "\n".join(lines) + "\n"
