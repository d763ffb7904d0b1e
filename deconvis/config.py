"""One config system for every subcommand: dataclass fields are YAML keys and ``--flags``.

A subcommand's settings are a dataclass deriving from :class:`Config`, its fields declared with
:func:`option` (default + help text). From that one declaration come

- the YAML keys (``--config FILE.yaml``; ``-`` and ``_`` are interchangeable in keys),
- one ``--flag`` per field (underscores become dashes; booleans as ``--x/--no-x``; lists as
  ``--x a,b`` or ``--x a --x b``), added by :func:`add_parser`,
- one coercion by the field's type hint (``bool``, ``int``, ``float``, ``str``, ``Optional[...]``,
  ``List[str]``, ``List[int]``, ``Union[str, Dict]``), or by a ``coerce=`` function in the field's
  metadata,
- one validation: the subclass's :meth:`Config.validate`, run once on the merged values.

Precedence: dataclass defaults < YAML file < flags given on the command line. Every problem is a
one-line :class:`DeconvisError` naming the source (file or ``command line``), the key and the fix;
an unknown key comes with the close matches.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from typing import Any, Callable, Dict, Mapping, Optional, Type, TypeVar

import yaml

from deconvis.errors import DeconvisError, close_matches

C = TypeVar("C", bound="Config")

#: words an ``Optional[...]`` field reads as "unset"
NONE_WORDS = ("", "none", "null", "all", "auto")
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def option(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - argparse wording
    """A dataclass field with ``help`` text; lists and dicts get a fresh copy per instance.

    ``meta`` keys understood here: ``short`` (an extra short flag, e.g. ``"-n"``), ``metavar``,
    ``coerce`` (``fn(value, where) -> value`` replacing the type-based coercion).
    """
    meta = {"help": help, **meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + field_name.replace("_", "-")


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config file into a dict (empty file -> {})."""
    if not os.path.isfile(path):
        raise DeconvisError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise DeconvisError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DeconvisError(f"config file {path!r} must hold a mapping of key: value, not {type(data).__name__}")
    return data


# -- coercion by type hint --------------------------------------------------------------------

def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise DeconvisError(f"{where} must be true or false, got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    if value is None:
        raise DeconvisError(f"{where} must be an integer, got nothing")
    if isinstance(value, bool):
        raise DeconvisError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise DeconvisError(f"{where} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise DeconvisError(f"{where} must be an integer, got {value!r}")
    return value


def _coerce_float(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        v = float(value)
    except (TypeError, ValueError):
        raise DeconvisError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise DeconvisError(f"{where} must be finite, got {value!r}")
    return v


def _coerce_str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DeconvisError(f"{where} must be a string, got {value!r}")
    return value


def _coerce_list(item: Any, value: Any, where: str) -> list:
    """A list from a YAML list, a comma separated string, or repeated flags (each maybe a,b)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int)) for v in value):
        what = "numbers" if item is int else "names"
        raise DeconvisError(f"{where} must be a list of {what} or a comma separated string, got {value!r}")
    parts = [p.strip() for v in value for p in str(v).split(",") if p.strip()]
    return [_coerce_int(p, where) for p in parts] if item is int else parts


def _type_label(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (dict, Mapping):
        return "a mapping"
    if origin is list:
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def coerce(tp: Any, value: Any, where: str) -> Any:
    """``value`` (from YAML or a flag's string) as type ``tp``; DeconvisError naming ``where``."""
    if tp is bool:
        return _coerce_bool(value, where)
    if tp is int:
        return _coerce_int(value, where)
    if tp is float:
        return _coerce_float(value, where)
    if tp is str or tp is Any:
        return _coerce_str(value, where) if tp is str else value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return _coerce_list(args[0] if args else str, value, where)
    if origin is typing.Union:
        members = [a for a in args if a is not type(None)]
        if len(members) < len(args):  # Optional[...]
            if value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS):
                return None
            if len(members) == 1:
                return coerce(members[0], value, where)
        for m in members:  # a Union takes a value already of one of its types as it is
            if isinstance(value, typing.get_origin(m) or m):
                return value
        raise DeconvisError(f"{where} must be {' or '.join(_type_label(m) for m in members)}, got {value!r}")
    raise TypeError(f"config field type {tp!r} has no coercion; give the field a coerce= function")


def check_device(name: str, key: str = "device") -> None:
    """A device setting names ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether it exists
    here is checked when the run starts: :func:`deconvis.utils.device.resolve_device`)."""
    if not (name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise DeconvisError(f"{key} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


# -- the base class ---------------------------------------------------------------------------

@dataclasses.dataclass
class Config:
    """Base of every subcommand's settings; subclasses are dataclasses of :func:`option` fields."""

    def validate(self) -> None:
        """Checks that need no model (ranges, names); raise :class:`DeconvisError`. May normalise
        values (e.g. a rule name to its canonical spelling). Override in subclasses."""

    def resolve(self, config_path: Optional[str]) -> None:
        """Fill derived defaults after YAML and flags are merged, before :meth:`validate`
        (``config_path``: the YAML file given, if any). Override in subclasses."""

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def field_types(cls) -> Dict[str, Any]:
        """Field name -> resolved type hint."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def update(self: C, values: Mapping[str, Any], source: str = "config") -> C:
        """Apply ``values`` (coerced; unknown keys are errors naming ``source``) in place."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        types = type(self).field_types()
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise DeconvisError(f"{source}: unknown key {key!r}" + close_matches(name, fields))
            where = f"{source}: {name}"
            fn: Optional[Callable[[Any, str], Any]] = fields[name].metadata.get("coerce")
            setattr(self, name, fn(value, where) if fn else coerce(types[name], value, where))
        return self

    @classmethod
    def load(cls: Type[C], path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> C:
        """Defaults < YAML ``path`` < ``overrides`` (e.g. flags), resolved and validated once."""
        cfg = cls()
        if path:
            cfg.update(load_yaml(path), source=path)
        if overrides:
            cfg.update(overrides, source="command line")
        cfg.resolve(path)
        return cfg.checked(force=True)

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any], source: str = "config") -> C:
        """Defaults < ``d``, resolved and validated."""
        cfg = cls().update(d, source=source)
        cfg.resolve(None)
        return cfg.checked(force=True)

    def checked(self: C, force: bool = False) -> C:
        """Run :meth:`validate` unless this instance already passed it; returns ``self``. Library
        entry points (``train(cfg)``, ``pipeline.run(cfg)``) call this, so a config built by
        :meth:`load` is not validated twice, and one built by hand still is."""
        if force or not self.__dict__.get("_validated", False):
            self.validate()
            self.__dict__["_validated"] = True
        return self

    def to_dict(self) -> Dict[str, Any]:
        """The settings as plain JSON-able values (field name -> value)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


# -- argparse, generated from the dataclass ------------------------------------------------------

def _metavar(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    if tp is int:
        return "N"
    if tp is float:
        return "X"
    if typing.get_origin(tp) is list:
        return "A,B,.."
    return "STR" if tp is str else "SPEC"


def _shown_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    value = f.default_factory()  # type: ignore[misc]
    return ",".join(str(v) for v in value) if isinstance(value, list) and value else value


def add_arguments(parser: argparse.ArgumentParser, config_cls: Type[Config]) -> None:
    """One ``--flag`` per field of ``config_cls`` (default None = not given, so YAML values survive)."""
    types = config_cls.field_types()
    for f in dataclasses.fields(config_cls):
        helptext = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help
        if types[f.name] is bool:
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=helptext)
            continue
        metavar = f.metadata.get("metavar") or _metavar(types[f.name])
        short = f.metadata.get("short")
        names = [flag_name(f.name)] + ([short] if short else [])
        if short:
            helptext += f" ({short} {metavar} is the same; use it under torchrun)"
        shown = _shown_default(f)
        repeat = typing.get_origin(types[f.name]) is list  # --x a,b or --x a --x b
        parser.add_argument(*names, dest=f.name, default=None, metavar=metavar,
                            action="append" if repeat else "store",
                            help=f"{helptext} (default: {'[]' if shown == [] else shown})")


def add_parser(subparsers: Any, name: str, config_cls: Type[Config], help: str,  # noqa: A002
               description: Optional[str] = None) -> argparse.ArgumentParser:
    """Register subcommand ``name``: ``--config FILE.yaml`` plus one flag per field of ``config_cls``.
    The caller sets ``func`` (``parser.set_defaults(func=...)``) and reads the config with :func:`parse`."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--config", "-c", metavar="FILE.yaml", default=None,
                        help="YAML config (keys = the flags below)")
    add_arguments(parser, config_cls)
    parser.set_defaults(config_cls=config_cls)
    return parser


def command(name: str, config_cls: Type[Config], func: Callable[[argparse.Namespace], int], help: str,  # noqa: A002
            description: Optional[str] = None) -> Callable[[Any], argparse.ArgumentParser]:
    """A subcommand module's ``add_parser(subparsers)``: :func:`add_parser` with ``func`` as the
    command (``func(args)`` reads its config with :func:`parse`)."""
    def add(subparsers: Any) -> argparse.ArgumentParser:
        parser = add_parser(subparsers, name, config_cls, help, description)
        parser.set_defaults(func=func)
        return parser

    return add


def overrides_from_args(config_cls: Type[Config], args: argparse.Namespace) -> Dict[str, Any]:
    """The fields given explicitly on the command line (values still strings; coerced later)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)
            if getattr(args, f.name, None) is not None}


def parse(config_cls: Type[C], args: argparse.Namespace) -> C:
    """The config of one command line: defaults < ``args.config`` YAML < flags set explicitly,
    coerced, resolved and validated once."""
    return config_cls.load(getattr(args, "config", None), overrides_from_args(config_cls, args))
