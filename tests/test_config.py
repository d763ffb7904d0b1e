"""Config file + command-line flags: precedence, coercion, validation, and flag/key parity."""
from __future__ import annotations

import argparse
import dataclasses
import os

import pytest

from deconvis.runs import config as C
from deconvis.errors import DeconvisError


def _parser() -> argparse.ArgumentParser:
    from deconvis.cli import visualize_cmd

    root = argparse.ArgumentParser()
    sub = root.add_subparsers(dest="command")
    return visualize_cmd.add_parser(sub)


def test_every_key_is_a_flag_and_every_flag_a_key():
    parser = _parser()
    flags = {opt for a in parser._actions for opt in a.option_strings if opt.startswith("--")}
    flags -= {"--help", "--config"}
    flags = {f for f in flags if not f.startswith("--no-")}  # negations of boolean flags
    keys = {C.flag_name(f.name) for f in dataclasses.fields(C.VisualizeConfig)}
    assert flags == keys
    # the flags the brief names are all there
    for f in ("--model", "--weights", "--layers", "--k", "--images", "--batch-size", "--device", "--out", "--run",
              "--max-images", "--channels", "--workers", "--rule", "--render-only", "--fresh", "--seed"):
        assert f in flags


def test_every_key_round_trips_through_its_flag():
    parser = _parser()
    sample = {"model": "vgg16", "weights": "DEFAULT", "layers": "conv1_1,conv5_3", "k": "4",
              "images": "builtin:skimage", "max_images": "7", "channels": "3", "batch_size": "5", "workers": "1",
              "device": "cpu", "rule": "guided", "seed": "3", "resize": "40", "crop": "32", "out": "o", "run": "r",
              "checkpoint_every": "2", "project_batch": "9", "per_sheet": "4", "sheet_columns": "2",
              "min_tile": "10", "max_tile": "20", "amp": "bf16", "prefetch_factor": "4", "dist_timeout": "30",
              "checkpoint_seconds": "5", "amp_pool": "2", "replay_max_mismatch": "3",
              "analyses": "diagnose,invariance", "analysis_images": "3", "correspondence_parts": "p.yaml",
              "max_pixels": "1000000", "bottom_k": "2", "checkpoints": "a.pt,runs/train", "evolution_images": "5",
              "featvis_steps": "7"}
    bools = {f.name for f in dataclasses.fields(C.VisualizeConfig) if f.type == "bool"}
    assert set(sample) | bools == set(C.FIELD_NAMES)
    argv = [x for k, v in sample.items() for x in (C.flag_name(k), v)]
    argv += [C.flag_name(b) for b in sorted(bools - {"fresh"})]
    cfg = C.load_config(None, C.overrides_from_args(parser.parse_args(argv)))
    assert cfg.layers == ["conv1_1", "conv5_3"] and cfg.k == 4 and cfg.max_images == 7 and cfg.rule == "guided"
    assert cfg.max_pixels == 1000000
    assert (cfg.checkpoints, cfg.evolution_images, cfg.featvis_steps, cfg.unit_erf) == (["a.pt", "runs/train"], 5, 7, True)
    assert (cfg.batch_size, cfg.seed, cfg.crop, cfg.out, cfg.run, cfg.max_tile) == (5, 3, 32, "o", "r", 20)
    assert cfg.render_only is True and cfg.fresh is False and cfg.progress is True
    assert (cfg.amp, cfg.prefetch_factor, cfg.dist_timeout, cfg.project_batch) == ("bf16", 4, 30, 9)
    assert cfg.channels_last is True and cfg.profile is True and cfg.tf32 is True
    assert (cfg.checkpoint_seconds, cfg.amp_pool, cfg.replay_max_mismatch, cfg.workers) == (5, 2, 3, 1)
    assert (cfg.analyses, cfg.analysis_images, cfg.correspondence_parts) == (["diagnose", "invariance"], 3, "p.yaml")
    cfg = C.load_config(None, C.overrides_from_args(parser.parse_args(["--workers", "auto", "--replay-max-mismatch",
                                                                        "none"])))
    assert cfg.workers is None and cfg.replay_max_mismatch is None
    cfg = C.load_config(None, C.overrides_from_args(parser.parse_args(["--fresh"])))
    assert cfg.fresh is True and cfg.render_only is False
    cfg = C.load_config(None, C.overrides_from_args(parser.parse_args(["--no-progress"])))
    assert cfg.progress is False
    cfg = C.load_config(None, C.overrides_from_args(parser.parse_args(["--no-unit-erf"])))
    assert cfg.unit_erf is False and cfg.featvis_steps == 0 and cfg.checkpoints == []


def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: alexnet\nk: 5\nlayers: [conv1, conv2]\nbatch-size: 8\nimages:\n  type: folder\n  path: x\n")
    cfg = C.load_config(str(path))
    assert (cfg.model, cfg.k, cfg.layers, cfg.batch_size, cfg.run) == ("alexnet", 5, ["conv1", "conv2"], 8, "exp")
    assert cfg.images == {"type": "folder", "path": "x"}
    cfg = C.load_config(str(path), {"k": "3", "layers": "conv5", "run": "mine"})
    assert (cfg.k, cfg.layers, cfg.run, cfg.model) == (3, ["conv5"], "mine", "alexnet")
    assert C.load_config(None, {"model": "x.py:make"}).run == "x_make"


@pytest.mark.parametrize("text,match", [
    ("modle: alexnet\n", "unknown key 'modle'.*did you mean: model"),
    ("k: 0\n", "k must be at least 1"),
    ("k: nine\n", "k must be an integer"),
    ("k: 2.5\n", "k must be an integer"),
    ("k: true\n", "k must be an integer"),
    ("rule: guidd\n", "did you mean: guided"),
    ("device: gpu\n", "device must be"),
    ("batch_size: 0\n", "batch_size must be at least 1"),
    ("channels: -2\n", "channels must be at least 1"),
    ("min_tile: 200\n", "larger than max_tile"),
    ("layers: {a: 1}\n", "list of names"),
    ("fresh: maybe\n", "true or false"),
    ("- a\n- b\n", "must hold a mapping"),
    ("k: [\n", "not valid YAML"),
    ("images: {type: zip}\n", "type must be"),
    ("run: a/b\n", "plain folder name"),
    ("render_only: true\nfresh: true\n", "contradict"),
    ("amp: fp32\n", "amp must be one of none, bf16, fp16"),
    ("amp: bf61\n", "did you mean: bf16"),
    ("project_batch: -1\n", "project_batch must be 0 or unset"),
    ("dist_timeout: 0\n", "dist_timeout must be at least 1"),
    ("prefetch_factor: 0\n", "prefetch_factor must be at least 1"),
    ("channels_last: sometimes\n", "true or false"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DeconvisError, match=match):
        C.load_config(str(path))


def test_missing_config_file():
    with pytest.raises(DeconvisError, match="does not exist"):
        C.load_config("/nonexistent/conf.yaml")


def test_optional_ints_accept_none_words():
    cfg = C.load_config(None, {"max_images": "all", "channels": "none", "crop": None})
    assert cfg.max_images is None and cfg.channels is None


def test_config_hash_is_stable_and_sensitive():
    a = C.to_dict(C.VisualizeConfig())
    b = dict(a, k=3)
    assert C.config_hash(a, C.MINING_KEYS) == C.config_hash(dict(a), C.MINING_KEYS)
    assert C.config_hash(a, C.MINING_KEYS) != C.config_hash(b, C.MINING_KEYS)
    assert C.config_hash(a, C.MINING_KEYS) == C.config_hash(dict(a, batch_size=1), C.MINING_KEYS)


@pytest.mark.parametrize("name", ["demo", "alexnet", "vgg16"])
def test_shipped_configs_validate(name):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = C.load_config(os.path.join(root, "configs", f"{name}.yaml"))
    assert cfg.run == name and cfg.k == 9


def test_speed_and_distributed_keys():
    cfg = C.load_config(None, {})
    assert (cfg.amp, cfg.channels_last, cfg.profile, cfg.dist_timeout, cfg.prefetch_factor) == ("none", False, False,
                                                                                                600, 2)
    assert cfg.project_batch == 0  # auto: sized by free memory
    assert C.load_config(None, {"project_batch": "auto"}).project_batch is None
    assert C.load_config(None, {"project_batch": "null"}).project_batch is None


def test_run_has_a_short_flag_that_passes_through_torchrun():
    from torch.distributed.run import get_args_parser

    argv = ["--nproc_per_node=2", "-m", "deconvis", "visualize", "-n", "exp1", "--k", "3", "--amp", "bf16",
            "--channels-last", "--dist-timeout", "30", "--out", "o"]
    launcher = get_args_parser().parse_args(argv)
    assert launcher.training_script == "deconvis" and launcher.training_script_args[:3] == ["visualize", "-n", "exp1"]
    cfg = C.load_config(None, C.overrides_from_args(_parser().parse_args(launcher.training_script_args[1:])))
    assert (cfg.run, cfg.k, cfg.amp, cfg.channels_last, cfg.dist_timeout) == ("exp1", 3, "bf16", True, 30)
    with pytest.raises(SystemExit):  # why -n exists: torchrun's own --run-path makes --run ambiguous
        get_args_parser().parse_args(argv[:4] + ["--run", "exp1"])
