"""Pieces every verb's parser shares: flags generated from a config dataclass (and its attribute docstrings), the
pre-parse that decides which flags exist, a verb's common options, and the plain table output.

`add_config_flags` is how Python, YAML and the CLI stay one source: each dataclass field becomes `--field-name`, its
docstring the help text; defaults are suppressed so a YAML file's values survive unless a flag overrides them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from .config import DataConfig, field_docs


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def text_flag(value: str) -> str:
    """A text flag as typed in a shell: `\\n`, `\\t` and `\\\\` become newline, tab and backslash, so
    `--template 'Review: {text}\\n{soft}Sentiment:{answer}'` means what the same string means in Python and in a
    double-quoted YAML value (a shell's single quotes keep the backslash). Other backslashes are kept as typed."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], value)


_METAVARS: dict[Any, str] = {int: "N", float: "X", _comma_list: "A,B,...", text_flag: "TEXT"}


def _flag_type(hint: Any) -> Any:
    """`bool`, or the converter for one field's CLI string (dicts such as the verbalizer parse in the config)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin is str:
        return text_flag
    if origin in (bool, int, float):
        return origin
    return _comma_list if origin is list else str


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str, taken: set[str]) -> list[str]:
    """Add `--field-name` for each field of a config dataclass (bools as `--x/--no-x`); returns the field names.

    Defaults are suppressed, so the namespace holds only what the user typed and YAML values are kept otherwise.
    """
    group = parser.add_argument_group(title)
    hints, docs, names = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        if f.name in taken:  # a method field shadows a section field, as in `api.split_kwargs`
            continue
        taken.add(f.name)
        names.append(f.name)
        doc = docs.get(f.name, "").rstrip(".")
        if "default:" not in doc:
            doc += f" (default: {f.default if f.default is not dataclasses.MISSING else None})"
        help_text = doc.replace("%", "%%")
        kind = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            if cls is DataConfig:  # file paths: taken as typed
                kind, metavar = str, "PATH"
            else:
                metavar = _METAVARS.get(kind, "TEXT")
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar, help=help_text)
    return names


def preparsed(argv: Sequence[str], verb: str, flag: str, from_config: Callable[[str], str], default: str) -> str:
    """What `verb` will use for `flag` (the flag, else the `--config` file's value, else `default`), read before the
    real parse because it decides which flags exist (a method's, a head's, an optimiser's)."""
    if argv[:1] != [verb]:
        return default
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    value = getattr(known, flag.lstrip("-").replace("-", "_"))
    if value:
        return value
    return from_config(known.config) if known.config else default


def make_verb(
    verbs: Any, name: str, help_text: str, func: Any, positional: str | None = "DIR"
) -> argparse.ArgumentParser:
    p = verbs.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    if positional:
        p.add_argument(positional.lower(), metavar=positional)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=func)
    return p


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def print_table(args: argparse.Namespace, headers: list[str], rows: list[list[str]], header: bool = True) -> None:
    if args.json:
        return
    table = ([headers] if header else []) + rows
    widths = [max(len(str(r[i])) for r in table) for i in range(len(headers))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
