"""Command-line flags from typed declarations: each option is declared once, as a function parameter or a
dataclass field, with its type, its default and its help line (the docstring), and the flags come from that.

* `add_signature(parser, fn)`: a flag per parameter of `fn` (`which` -> `--which`, `batch_size` ->
  `--batch-size`, a bool that is on by default -> `--no-x`), its help from the docstring's `Args:` section; a
  dataclass-typed parameter becomes its fields' flags (`add_options`), or a jsonargparse section
  (`--model.n_layer`: every field also a config-file key) when named in `sections`.
* `call(fn, args)`: `fn` called with what was parsed for its parameters.
* `Parser`: jsonargparse's parser, with one-line errors naming the closest valid flag.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import os
import re
import sys
import types
import typing
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from . import UserError
from .utils import load_yaml, one_line_message, read_text

# field docstrings (LitGPT's args.py style) become the --help text of --model.* / --train.* / --optim.*
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class Parser(ArgumentParser):
    """jsonargparse parser whose errors are one line, naming the closest valid key."""

    def error(self, message: str, ex: Optional[Exception] = None):  # type: ignore[override]
        lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
        msg = self._type_error(lines) or (lines[0] if lines else "invalid arguments")
        # jsonargparse nests the real reason ("... does not accept option 'x'") below a generic line
        for ln in lines:
            if "accept" in ln or "unrecognized" in ln or "not a valid" in ln.lower():
                msg = ln
                break
        bad = re.search(r"unrecognized arguments: (--?[\w.\-]+)", msg) or re.search(r"option '([\w.\-]+)'", msg)
        if bad:
            key = bad.group(1)
            flag = key if key.startswith("-") else f"--{key}"
            options = [o for p in _all_parsers(self) for a in p._actions for o in a.option_strings]
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.6)
            if close:
                msg += f" (did you mean {close[0].lstrip('-') if not key.startswith('-') else close[0]}?)"
        print(f"error: {_one_line(self._flag_names(msg))}", file=sys.stderr)
        sys.exit(2)

    def _flag_names(self, msg: str) -> str:
        """argparse names a missing required option by its dest (`sft.train_file`): name its flag (`--train`)."""
        m = re.match(r"(.*the following arguments are required: )(.*)", msg)
        if m is None:
            return msg
        flag_of = {a.dest: a.option_strings[0] for p in _all_parsers(self) for a in p._actions if a.option_strings}
        names = [n.strip() for n in m.group(2).split(",")]
        return m.group(1) + ", ".join(flag_of.get(n.rsplit(".", 1)[-1], n) for n in names)

    def _type_error(self, lines: list[str]) -> Optional[str]:
        """jsonargparse's several-line type error as one line: the flag, what it takes, the value given."""
        key = re.match(r'Parser key "([^"]+)":', lines[0]) if lines else None
        got = next((m.group(1) for ln in lines if (m := re.search(r"(?:Got|Given) value:\s*(.*)", ln))), None)
        if key is None or got is None:
            return None
        flag = next((a.option_strings[-1] for p in _all_parsers(self) for a in p._actions
                     if a.dest == key.group(1) and a.option_strings), "--" + key.group(1))
        subtypes = next((ln for ln in lines if ln.startswith(("Subtypes:", "Expected a"))), "")
        choices = re.search(r"Literal\[(.*?)\]", subtypes)
        if choices:
            want = "one of " + ", ".join(c.strip(" '\"") for c in choices.group(1).split(","))
        elif n := re.search(r"tuple with (\d+) elements", subtypes):
            want = f"a list of {n.group(1)} values"
        else:
            names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", subtypes)
            want = " or ".join(dict.fromkeys(_TYPE_NAMES.get(n, n) for n in names)) or subtypes or "another value"
        return f"{flag} takes {want}, got {({'None': 'null', 'True': 'true', 'False': 'false'}).get(got, got)!r}"


_TYPE_NAMES = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string",
               "NoneType": "null", "Path": "a path", "dict": "a mapping"}


def _one_line(message: str) -> str:
    """An error stays one line, and short (utils.one_line_message)."""
    return one_line_message(message)


CONFIG_MAX_BYTES = 1 << 20  # a config file is a few kilobytes; anything this large is the wrong file


class ConfigFile(ActionConfigFile):
    """--config FILE, or inline YAML/JSON text: read and checked here first (a regular UTF-8 file of at most
    CONFIG_MAX_BYTES, YAML whose aliases don't multiply: utils.load_yaml), so a binary or latin-1 file, a FIFO,
    /dev/zero, a 30 MB line or an alias bomb is one error line, not a traceback, a hang or a 30 MB message."""

    def __call__(self, parser, cfg, values, option_string=None):
        given = str(values)
        shown = given if len(given) <= 80 else given[:77] + "..."
        if os.path.exists(given):
            try:
                text = read_text(given, limit=CONFIG_MAX_BYTES)
            except UserError as e:
                raise UserError(f"--config {e}") from None
        elif len(given) > CONFIG_MAX_BYTES:
            raise UserError(f"--config {shown}: no such file, and too long to be inline YAML/JSON")
        else:
            text = given
        load_yaml(text, f"--config {shown}")
        super().__call__(parser, cfg, values, option_string)


def _all_parsers(parser: ArgumentParser):
    yield parser
    subs = getattr(parser, "_subcommands_action", None)
    if subs is not None:
        for p in subs.choices.values():
            yield from _all_parsers(p)


# ---------------------------------------------------------------- flags from dataclasses and signatures
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), the one source of its --help line."""
    import docstring_parser

    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse_from_object(cls).params}


def _flag(f: dataclasses.Field) -> str:
    name = f.name.replace("_", "-")
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    return f"--no-{name}" if f.type in (bool, "bool") and f.default is True else f"--{name}"


def add_options(parser: ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """A dash-named flag per field of `cls` (bools: `--x`, or `--no-x` when on by default)."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # aliases: a field's older flag names
        add_flag(parser, f.name, hints[f.name], default, docs.get(f.name, ""),
                 flags=(_flag(f), *f.metadata.get("aliases", ())))


def options_from(args: Any, cls: type, **values: Any):
    """The dataclass `cls` from the parsed flags of add_options (fields not on the command line keep defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    try:
        return cls(**{**given, **values})
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed on a command line, as the characters they stand for."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def param_docs(fn: Callable) -> dict[str, str]:
    """Each parameter's description in `fn`'s docstring (its `Args:` section), as one line."""
    import docstring_parser

    return {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse(fn.__doc__ or "").params}


def _cli_type(hint: Any) -> Any:
    """The type a flag parses: a path-like parameter (`str | os.PathLike`) takes a Path; a path or something
    else (`str | os.PathLike | Mapping`) takes the something else or a string."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) not in (Union, types.UnionType) or not any(_pathlike(a) for a in args):
        return hint
    rest = [a for a in args if not _pathlike(a) and a is not type(None) and a is not str]
    if not rest:
        return Optional[Path] if type(None) in args else Path
    return Optional[Union[tuple(rest + [str])]] if type(None) in args else Union[tuple(rest + [str])]


def _pathlike(t: Any) -> bool:
    return t in (Path, os.PathLike) or typing.get_origin(t) is os.PathLike


def _dataclass_of(hint: Any) -> Optional[type]:
    """The dataclass a parameter takes (`Optional[X]` too), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _is_sequence(hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    inner = [a for a in args if a is not type(None)]
    return origin in (tuple, list, collections.abc.Sequence) or (
        origin in (Union, types.UnionType) and bool(inner) and _is_sequence(inner[0]))


def add_flag(parser: ArgumentParser, name: str, hint: Any, default: Any, help_text: str, *,
             flags: tuple[str, ...] = ()) -> None:
    """One dash-named flag: a switch for a bool (`--x`, or `--no-x` when on by default), several values for a
    tuple/list, else one value of type `hint`; no default makes it required."""
    if not flags:
        dashed = name.replace("_", "-")
        flags = (f"--no-{dashed}" if hint is bool and default is True else f"--{dashed}",)
    if default is inspect.Parameter.empty:
        parser.add_argument(*flags, dest=name, type=hint, required=True, help=help_text)
    elif hint is bool:
        parser.add_argument(*flags, dest=name, action="store_false" if default is True else "store_true",
                            help=help_text)
    elif _is_sequence(hint):
        parser.add_argument(*flags, dest=name, nargs="+", default=default, help=help_text)
    else:
        parser.add_argument(*flags, dest=name, type=hint, default=default, help=help_text)


def add_signature(parser: ArgumentParser, fn: Callable, *, positional: tuple[str, ...] = (),
                  skip: tuple[str, ...] = (), sections: tuple[str, ...] = (), flags: Mapping[str, str] = {},
                  defaults: Mapping[str, Any] = {}, help: Mapping[str, str] = {},
                  types: Mapping[str, Any] = {}) -> None:
    """The flags of `fn`'s parameters (all but `skip` and **kwargs), from its signature and docstring.

    `positional`: parameters given without a flag (`run`); a sequence takes any number. `sections`:
    dataclass parameters given as jsonargparse sections (`--model.*`). `flags`: a parameter whose flag
    is not its dash-named name (`train_file` -> `--train`). `defaults`: a default for a parameter the
    function requires but the command does not. `help`: a parameter's help line, where the docstring
    has none. `types`: a narrower type than the signature's (a Literal of the values it accepts).
    """
    hints, docs = typing.get_type_hints(fn), param_docs(fn)
    for name, param in inspect.signature(fn).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = _cli_type(types.get(name, hints.get(name, str)))
        cls = _dataclass_of(hint)
        if cls is not None and name in sections:
            parser.add_class_arguments(cls, name)
            continue
        if cls is not None:
            add_options(parser, cls)
            continue
        help_text, default = docs.get(name) or help.get(name, ""), defaults.get(name, param.default)
        if name in positional:
            if _is_sequence(hint):
                parser.add_argument(name, nargs="*", default=[] if default is param.empty else default, help=help_text)
            else:
                parser.add_argument(name, type=hint, help=help_text)
        else:
            add_flag(parser, name, hint, default, help_text, flags=(flags[name],) if name in flags else ())


def kwargs_for(fn: Callable, args: Namespace, **values: Any) -> dict[str, Any]:
    """`fn`'s keyword arguments from the parsed flags of its parameters (as add_signature made them), and `values`."""
    hints, kwargs = typing.get_type_hints(fn), dict(values)
    for name in inspect.signature(fn).parameters:
        if name in values:
            continue
        cls = _dataclass_of(hints.get(name))
        given = getattr(args, name, None)
        if cls is not None and isinstance(given, Namespace):  # a --section.* group
            try:
                kwargs[name] = cls(**vars(given))
            except (TypeError, ValueError) as e:
                raise UserError(str(e)) from None
        elif cls is not None and any(f.name in args for f in dataclasses.fields(cls)):
            kwargs[name] = options_from(args, cls)
        elif name in args:
            kwargs[name] = given
    return kwargs


def call(fn: Callable, args: Namespace, **values: Any) -> Any:
    """`fn` called with the parsed flags of its parameters and `values`."""
    return fn(**kwargs_for(fn, args, **values))
