"""Stand-in for ``deconvis.runs.configbase`` (same API) until that module lands on this branch.

A subcommand's settings are a dataclass deriving :class:`Config` whose fields are made with
:func:`option`; every field is a YAML key (``--config FILE``) and a ``--flag`` (underscores become
dashes), and the reverse. Precedence: defaults < YAML < flags. Supported field types: ``bool``,
``int``, ``float``, ``str``, ``Optional[int]``, ``Optional[str]``, ``List[str]``, ``List[int]``,
``List[float]`` (lists: YAML lists or comma separated strings).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

from deconvis.errors import DeconvisError, close_matches

C = TypeVar("C", bound="Config")


def option(default: Any, help: str) -> Any:  # noqa: A002 - argparse wording
    """A config field with a default and a help text (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Base of every subcommand's settings; subclasses add fields and may extend :meth:`validate`."""

    def validate(self) -> "Config":
        """Check value ranges; raise :class:`DeconvisError` naming the key. Returns ``self``."""
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _kind(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return t.replace("typing.", "").replace(" ", "")


def _scalar(kind: str, value: Any, where: str) -> Any:
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise DeconvisError(f"{where} must be true or false, got {value!r}")
    if kind in ("int", "float"):
        if isinstance(value, bool):
            raise DeconvisError(f"{where} must be a number, got {value!r}")
        try:
            num = float(value) if kind == "float" else float(str(value).strip())
        except (TypeError, ValueError):
            raise DeconvisError(f"{where} must be {'an integer' if kind == 'int' else 'a number'}, "
                                f"got {value!r}") from None
        if kind == "int":
            if not num.is_integer():
                raise DeconvisError(f"{where} must be an integer, got {value!r}")
            return int(num)
        return num
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DeconvisError(f"{where} must be a string, got {value!r}")
    return value


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    kind, where = _kind(f), f"{source}: {f.name}"
    if kind.startswith("Optional["):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        return _scalar(kind[len("Optional["):-1], value, where)
    if kind.startswith("List["):
        elem = kind[len("List["):-1]
        if value is None:
            return []
        items = [s.strip() for s in value.split(",") if s.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise DeconvisError(f"{where} must be a list or a comma separated string, got {value!r}")
        return [_scalar(elem, v, where) for v in items]
    return _scalar(kind, value, where)


def from_mapping(config_cls: Type[C], values: Mapping[str, Any], base: Optional[C] = None,
                 source: str = "config") -> C:
    """``base`` (default: the defaults) with ``values`` applied; unknown keys are errors."""
    cfg = dataclasses.replace(base) if base is not None else config_cls()
    by_name = {f.name: f for f in fields(config_cls)}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise DeconvisError(f"{source}: unknown key {key!r}" + close_matches(name, by_name))
        setattr(cfg, name, _coerce(by_name[name], value, source))
    return cfg


def load_yaml(path: str) -> Dict[str, Any]:
    """The mapping in YAML file ``path`` (empty file: {})."""
    import yaml

    if not os.path.isfile(path):
        raise DeconvisError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise DeconvisError(f"config file {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DeconvisError(f"config file {path!r} must hold a mapping of keys to values")
    return data


def add_parser(subparsers: "argparse._SubParsersAction", name: str, config_cls: Type[Config],
               help: str) -> argparse.ArgumentParser:  # noqa: A002
    """A subparser with ``--config YAML`` and one ``--flag`` per field of ``config_cls``."""
    p = subparsers.add_parser(name, help=help, description=(config_cls.__doc__ or help).strip())
    p.add_argument("--config", "-c", metavar="YAML", help="YAML file with any of the keys below")
    for f in fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if _kind(f) == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, list):
            default = ",".join(str(d) for d in default)
        p.add_argument(flag, dest=f.name, default=None, metavar="VALUE",
                       help=f"{helptext} (default: {default})" if default not in ("", None) else helptext)
    return p


def parse(config_cls: Type[C], args: argparse.Namespace) -> C:
    """defaults < ``args.config`` YAML < flags given on the command line; validated."""
    cfg = config_cls()
    path = getattr(args, "config", None)
    if path:
        cfg = from_mapping(config_cls, load_yaml(path), cfg, source=path)
    flags = {f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name, None) is not None}
    cfg = from_mapping(config_cls, flags, cfg, source="command line")
    cfg.validate()
    return cfg
