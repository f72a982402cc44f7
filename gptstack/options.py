"""Command-line options generated from the config dataclasses, so every default lives once.

A subcommand's options are the fields of the dataclass its library function takes: the flag is the
field name with dashes (`max_seqs` → `--max-seqs`), the type and the choices come from the field's
annotation, the help text is the field's trailing comment, and the default is the dataclass's own
(shown in `--help`, never copied). Options the user did not give are left out of the parsed
namespace (argparse.SUPPRESS), so `from_args` builds the config from the dataclass defaults plus
exactly what was typed.

    @dataclass
    class ServeConfig:
        max_waiting: int = 256  # waiting requests per model before 503

    add_options(parser, ServeConfig)      # --max-waiting N   waiting requests per model before 503 (default 256)
    cfg = from_args(ServeConfig, args)    # ServeConfig(max_waiting=…)

Bools become `--x/--no-x`; `X | None` takes an X; tuples and lists take one or more values; dicts
take a JSON object, a JSON file, or KEY=VALUE pairs (space- or comma-separated); `Literal[…]` gives
choices. A `defaults` instance replaces the dataclass defaults where a command wants others (chat
samples at 0.8, the library at 1.0). This is a small helper over argparse, not a framework: a
command can still add options of its own by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import re
import tokenize
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

from gptstack.config import ConfigError, coerce


@cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source (inherited fields included)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            m = re.match(r"\s*(\w+)\s*:", lines[tok.start[0] - 1])
            if m and not lines[tok.start[0] - 1].lstrip().startswith("#"):
                out[m.group(1)] = tok.string.lstrip("#").strip()
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _parse_dict(name: str, values: list[str]) -> dict:
    """A JSON object, a JSON file, or KEY=VALUE pairs (values read as JSON where they parse)."""
    if len(values) == 1 and values[0].lstrip().startswith("{"):
        raw = values[0]
    elif len(values) == 1 and "=" not in values[0] and Path(values[0]).is_file():
        raw = Path(values[0]).read_text()
    else:
        out = {}
        for pair in (p for v in values for p in v.split(",") if p):  # "a=1,b=2" or "a=1 b=2"
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"--{name.replace('_', '-')} wants a JSON object, a JSON file or KEY=VALUE, got {pair!r}"
                )
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value
        return out
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--{name.replace('_', '-')}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--{name.replace('_', '-')}: expected a JSON object")
    return value


class _DictAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, _parse_dict(self.dest, values))
        except ConfigError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def _parser(name: str, spelled: str):
    """argparse `type=`: the `--set` coercion of config.coerce, its error printed as it is."""

    def parse(raw: str) -> Any:
        try:
            return coerce(name, spelled, raw)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _kwargs_for(name: str, tp: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field of type `tp`."""
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = typing.get_args(inner)
        return {"choices": choices, "type": type(choices[0])}
    if origin in (tuple, list):
        item = typing.get_args(inner)[0] if typing.get_args(inner) else str
        return {"action": "extend", "nargs": "+", "type": _parser(name, item.__name__)}
    if origin is dict or inner is dict:
        return {"nargs": "+", "action": _DictAction, "metavar": "JSON|KEY=VALUE"}
    spelled = inner.__name__ if isinstance(inner, type) else str(inner)
    spelled += " | None" if optional else ""
    metavar = {"int": "N", "float": "X"}.get(spelled.split()[0], "TEXT")
    return {"type": _parser(name, spelled), "metavar": metavar}


def _owned(cls: type) -> str:
    """The namespace attribute listing the options add_options made for `cls`."""
    return f"_options_of_{cls.__module__}.{cls.__qualname__}"


def add_options(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Any = None,
    skip: tuple[str, ...] = (),
    positional: tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
    required: tuple[str, ...] = (),
) -> None:
    """Add one option per field of the dataclass `cls` (fields in `positional` become positional
        arguments; a field without a default is required). `flags` renames a field's flag (a file format
        keeps the field's name: PrepareConfig's `inputs` is typed `--input`). `required`: fields the command
    needs although the library has a default for them (post-training's `--init`)."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    added = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in skip]
    parser.set_defaults(**{_owned(cls): added})  # from_args reads only these: two configs may share a name
    for f in dataclasses.fields(cls):
        if f.name not in added:
            continue
        default = _default(f, defaults)
        kwargs = _kwargs_for(f.name, hints[f.name], default)
        text = helps.get(f.name, "")
        shown = default is not dataclasses.MISSING and default not in (None, "", (), [], {})
        if shown and not isinstance(default, bool):
            text += f" (default: {default})"
        elif isinstance(default, bool) and default:
            text += " (default: on)"
        kwargs["help"] = text.strip().replace("%", "%%") or None  # argparse %-formats help
        if f.name in positional:
            kwargs.pop("metavar", None)
            parser.add_argument(f.name, **kwargs)
            continue
        needed = default is dataclasses.MISSING or f.name in required
        parser.add_argument(
            "--" + (flags or {}).get(f.name, f.name).replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            required=needed,
            **kwargs,
        )


def from_args(cls: type, args: argparse.Namespace, defaults: Any = None, **extra: Any) -> Any:
    """The config of the fields the user gave (others at `defaults` or the dataclass defaults)."""
    hints = typing.get_type_hints(cls)
    owned = getattr(args, _owned(cls), None)  # None: a namespace add_options did not build
    names = set(owned) if owned is not None else {f.name for f in dataclasses.fields(cls) if f.init}
    given = {k: v for k, v in vars(args).items() if k in names}
    for k, v in given.items():
        if isinstance(v, list) and typing.get_origin(_unwrap_optional(hints[k])[0]) is tuple:
            given[k] = tuple(v)
    given.update(extra)
    if defaults is not None:
        return dataclasses.replace(defaults, **given)
    return cls(**given)
