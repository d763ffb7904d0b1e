"""The config base every subcommand shares: keys = flags, one coercion, one validation."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Dict, List, Optional, Union

import pytest

from deconvis import config as cb
from deconvis.errors import DeconvisError


@dataclasses.dataclass
class Demo(cb.Config):
    size: int = cb.option(3, "a size")
    ratio: float = cb.option(0.5, "a ratio")
    names: List[str] = cb.option(["a"], "names")
    steps: List[int] = cb.option([], "steps")
    limit: Optional[int] = cb.option(None, "a limit")
    spec: Union[str, Dict[str, int]] = cb.option("x", "a spec")
    fast: bool = cb.option(False, "go fast")
    label: str = cb.option("", "a label", short="-l")

    def validate(self) -> None:
        if self.size < 1:
            raise DeconvisError(f"size must be at least 1, got {self.size}")
        self.calls = getattr(self, "calls", 0) + 1

    def resolve(self, config_path: Optional[str]) -> None:
        self.label = self.label or f"s{self.size}"


def _parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    return cb.add_parser(root.add_subparsers(), "demo", Demo, help="demo")


def test_flags_are_the_fields_and_bools_negate():
    flags = {o for a in _parser()._actions for o in a.option_strings}
    assert flags == {"-h", "--help", "--config", "-c", "--size", "--ratio", "--names", "--steps", "--limit", "--spec",
                     "--fast", "--no-fast", "--label", "-l"}


def test_precedence_coercion_and_one_validation(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("size: 4\nratio: 2\nnames: [b, c]\nsteps: 1,2\nlimit: none\nspec: {a: 1}\nfast: yes\n")
    cfg = cb.parse(Demo, _parser().parse_args(["-c", str(path), "--size", "5", "--no-fast"]))
    assert (cfg.size, cfg.ratio, cfg.names, cfg.steps, cfg.limit, cfg.spec, cfg.fast) == \
        (5, 2.0, ["b", "c"], [1, 2], None, {"a": 1}, False)
    assert cfg.label == "s5" and cfg.calls == 1
    assert cfg.checked() is cfg and cfg.calls == 1  # already validated: not again
    assert Demo(size=2).checked().calls == 1        # built by hand: validated on first use
    assert Demo.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert Demo().names is not Demo().names


@pytest.mark.parametrize("values,match", [
    ({"sise": 1}, "command line: unknown key 'sise'.*did you mean: size"),
    ({"size": "2.5"}, "size must be an integer"),
    ({"ratio": "inf"}, "ratio must be finite"),
    ({"ratio": "abc"}, "ratio must be a number"),
    ({"steps": "1,x"}, "steps must be an integer"),
    ({"spec": 3}, "spec must be a string or a mapping"),
    ({"fast": "maybe"}, "fast must be true or false"),
    ({"size": "0"}, "size must be at least 1"),
])
def test_errors_are_one_line_and_name_the_key(values, match):
    with pytest.raises(DeconvisError, match=match):
        Demo.load(None, values)
