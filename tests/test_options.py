"""The CLI is generated from the config dataclasses: one default, one help text, typed parsing."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from gptstack.cli import COMMANDS, build_parser
from gptstack.infer.chat import CHAT_SAMPLING
from gptstack.infer.sampling import SamplingParams
from gptstack.options import add_options, field_help, from_args


@dataclass
class Demo:
    out: str  # where to write
    steps: int = 10  # optimizer steps
    lr: float | None = None  # peak learning rate (none: the recipe's)
    pack: bool = True  # several rows per sequence
    kind: Literal["a", "b"] = "a"  # which variant
    names: tuple[str, ...] = ("x",)  # module names
    weights: dict = field(default_factory=dict)  # {source: weight}


def parse(*argv: str, **kwargs) -> argparse.Namespace:
    p = argparse.ArgumentParser(exit_on_error=False)
    add_options(p, Demo, **kwargs)
    return p.parse_args(argv)


def test_fields_become_typed_options_with_their_comment_as_help():
    cfg = from_args(Demo, parse("--out", "o", "--steps", "3", "--lr", "0.5", "--no-pack", "--kind", "b",
                                "--names", "p", "q", "--weights", "web=2", "code=0.5"))  # fmt: skip
    assert cfg == Demo("o", 3, 0.5, False, "b", ("p", "q"), {"web": 2, "code": 0.5})
    assert from_args(Demo, parse("--out", "o", "--weights", '{"a": 1}')).weights == {"a": 1}
    assert from_args(Demo, parse("--out", "o", "--weights", "a=1,b=x")).weights == {"a": 1, "b": "x"}
    assert from_args(Demo, parse("--out", "o")) == Demo("o")  # untouched options keep the dataclass defaults
    p = argparse.ArgumentParser()
    add_options(p, Demo)
    text = p.format_help()
    assert "optimizer steps (default: 10)" in text and "peak learning rate (none: the recipe's)" in text
    assert "--pack, --no-pack" in text and "{a,b}" in text
    assert field_help(Demo)["weights"] == "{source: weight}"


def test_bad_values_and_missing_required_fields_are_refused():
    with pytest.raises(argparse.ArgumentError, match="steps='ten' is not a valid int"):
        parse("--out", "o", "--steps", "ten")
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'c'"):
        parse("--out", "o", "--kind", "c")
    with pytest.raises(argparse.ArgumentError, match="wants a JSON object, a JSON file or KEY=VALUE"):
        parse("--out", "o", "--weights", "oops")
    p = argparse.ArgumentParser(exit_on_error=False)
    add_options(p, Demo)
    with pytest.raises(SystemExit):  # argparse exits on a missing required option, after printing its name
        p.parse_args([])


def test_positional_renamed_skipped_and_instance_defaults():
    args = parse("o", "--steps-total", "4", positional=("out",), skip=("lr",), flags={"steps": "steps_total"})
    assert from_args(Demo, args) == Demo("o", steps=4)
    p = argparse.ArgumentParser()
    add_options(p, SamplingParams, defaults=CHAT_SAMPLING)
    assert "(default: 256)" in p.format_help()  # chat's own default, shown from the instance
    assert from_args(SamplingParams, p.parse_args([]), CHAT_SAMPLING) == CHAT_SAMPLING


def has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def subparser(parser: argparse.ArgumentParser, path: str) -> argparse.ArgumentParser:
    for word in path.split():
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return parser


def test_every_command_with_no_options_gets_exactly_its_configs_defaults():
    parser = build_parser()
    for path, _, options in COMMANDS:
        sub = subparser(parser, path)
        required = [a for a in sub._actions if a.required or (not a.option_strings and a.dest != "help")]
        argv = path.split()
        for a in required:  # a placeholder for what the user must give
            value = next(iter(a.choices)) if a.choices else "1" if a.type is int or a.metavar == "N" else "x"
            argv += [value] if not a.option_strings else [a.option_strings[0], value]
        args = parser.parse_args(argv)
        given = {a.dest for a in required}
        for kind, *rest in options:
            if kind in ("arg", "one_of") or rest[0].get("defaults") is not None:
                continue
            skipped = set(rest[0].get("skip", ()))
            missing = {
                f.name: "" for f in dataclasses.fields(kind) if f.name in skipped and f.default is dataclasses.MISSING
            }
            cfg = from_args(kind, args, **missing)  # serve's LoadConfig: the checkpoint comes per model
            defaults = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(kind) if f.name in given}
            assert cfg == kind(**defaults, **missing), f"`gptstack {path}` changes a default of {kind.__name__}"


def test_every_generated_option_has_help():
    missing = []
    for path, _, options in COMMANDS:
        for kind, *rest in options:
            if kind in ("arg", "one_of"):
                continue
            skip = set(rest[0].get("skip", ()))
            helps = field_help(kind)
            missing += [f"{path}: {kind.__name__}.{f.name}" for f in dataclasses.fields(kind)
                        if f.name not in skip and f.init and not helps.get(f.name)]  # fmt: skip
    assert len(missing) <= 12, "options without a help comment:\n" + "\n".join(missing)
