"""Config dataclasses as the single source of a command's options.

A training command's arguments are generated from its config dataclass: the flag name, type, default,
choices and help of each option are written once, in the dataclass field::

    steps: int = option(1000, "optimizer steps in total")
    run_dir: str = option(help="run folder", flag="--out")          # no default: required
    ema_decay: float | None = option(None, "keep an EMA of the weights", flag="--ema", metavar="DECAY")

Types map to argparse as: ``bool`` -> ``--x/--no-x``; ``tuple[float, float]`` -> ``nargs=2``;
``dict`` -> a JSON object or JSON file (``--model-config``); ``X | None`` -> ``X``. ``--config run.json``
loads a whole config (e.g. a run's ``train_config.json``); flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from rqvae.errors import UserError

T = TypeVar("T")
_NO_DEFAULT: Any = dataclasses.MISSING


def option(default: Any = _NO_DEFAULT, help: str = "", *, flag: str | None = None,  # noqa: A002
           metavar: str | None = None, choices: tuple[Any, ...] | None = None,
           factory: Any = _NO_DEFAULT) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring)."""
    meta = {"help": help, "flag": flag, "metavar": metavar, "choices": choices}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def _base_type(tp: Any) -> Any:
    """``X | None`` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _NO_DEFAULT:
        return f.default
    if f.default_factory is not _NO_DEFAULT:
        return f.default_factory()
    return _NO_DEFAULT


def json_object(value: str, what: str = "--model-config") -> dict:
    """A JSON object given inline or as a file (a model folder's config.json works too)."""
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"{what} {value} is neither a JSON object nor an existing file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JSON object")
    data.pop("model_type", None)
    return data


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    name, meta = flag_name(f), f.metadata
    default = _default_of(f)
    help_ = meta.get("help", "")
    if default is _NO_DEFAULT:
        help_ += " (required)"
    elif default is not None and default != {}:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_ += f" (default: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_.replace("%", "%%")}
    base = _base_type(tp)
    origin = typing.get_origin(base)
    if base is bool:
        parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        return
    if origin is tuple:
        args = typing.get_args(base)
        kw.update(nargs=len(args), type=args[0])
    elif base is dict or origin is dict:
        kw.update(type=str)  # parsed by json_object after argparse, so that errors are UserErrors
    else:
        kw.update(type=base)
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    parser.add_argument(name, **kw)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the dataclass ``cls`` (required fields first), plus ``--config FILE``."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})  # the command's own options before inherited ones

    def order(f: dataclasses.Field) -> tuple[bool, bool]:
        return _default_of(f) is not _NO_DEFAULT, f.name not in own

    for f in sorted(dataclasses.fields(cls), key=order):
        _add_field(parser, f, hints[f.name])
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="JSON file of a whole config (e.g. a run's train_config.json); flags given "
                             "on the command line override its values")


def config_from_dict(cls: type[T], values: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from plain values (JSON lists become tuples; unknown keys are refused)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"{source} has unknown options {unknown}; valid ones: {sorted(fields)}")
    out = {}
    for key, value in values.items():
        if typing.get_origin(_base_type(hints[key])) is tuple and isinstance(value, list):
            value = tuple(value)
        out[key] = value
    missing = [flag_name(f) for name, f in fields.items()
               if name not in out and _default_of(f) is _NO_DEFAULT]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: give {'it' if len(missing) == 1 else 'them'} on the "
                        "command line or in --config FILE")
    return cls(**out)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config of parsed arguments: ``--config`` file values, then the flags given explicitly."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        values.update(json_object(path, "--config"))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            base = _base_type(hints[f.name])
            if (base is dict or typing.get_origin(base) is dict) and isinstance(value, str):
                value = json_object(value, flag_name(f))
            values[f.name] = value
    return config_from_dict(cls, values, source=f"--config {path}" if path else "the command line")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the effective config as JSON (loadable with ``--config``)."""
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def load_config(cls: type[T], path: str | Path) -> T:
    return config_from_dict(cls, json_object(str(path), "--config"), source=str(path))
