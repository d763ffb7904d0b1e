"""Model loading (deconvis.io.models): torchvision weights from a temp hub cache under the real
file name, checkpoints with ``module.`` prefixes, and one-line errors for checkpoints of another
architecture, unsafe pickles, missing files."""
from __future__ import annotations

import collections
import os

import pytest
import torch
import torchvision.models as tvm

from deconvis.errors import DeconvisError
from deconvis.io.models import load_model
from deconvis.training.demo_model import zfnet_demo


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _random_state(model: torch.nn.Module, seed: int = 3) -> "collections.OrderedDict[str, torch.Tensor]":
    g = torch.Generator().manual_seed(seed)
    return collections.OrderedDict((k, torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point()
                                    else v.clone()) for k, v in model.state_dict().items())


def test_torchvision_weights_come_from_the_hub_cache_under_their_real_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = tvm.ResNet18_Weights.IMAGENET1K_V1.url
    path = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    with pytest.raises(DeconvisError) as e:
        load_model("resnet18", "IMAGENET1K_V1")
    msg = _one_line(e)
    assert "resnet18-f37072fd.pth" in msg and str(path) in msg and "never downloads" in msg
    state = _random_state(tvm.resnet18())
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    lm = load_model("resnet18", "IMAGENET1K_V1")
    got = lm.model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert lm.preprocess.crop == (224, 224) and lm.preprocess.resize == 256
    assert not lm.model.training
    # the DEFAULT alias resolves to the same file
    assert torch.equal(load_model("resnet18", "DEFAULT").model.fc.weight, state["fc.weight"])


def test_checkpoint_with_module_prefix_and_wrapper_key(tmp_path):
    state = _random_state(zfnet_demo())
    path = tmp_path / "ddp.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in state.items()}}, path)
    got = load_model("zfnet_demo", str(path)).model.state_dict()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_checkpoint_of_another_architecture_names_tensor_shapes_and_owner(tmp_path):
    path = tmp_path / "alexnet.pth"
    torch.save(tvm.alexnet().state_dict(), path)
    with pytest.raises(DeconvisError) as e:
        load_model("zfnet_demo", str(path))
    msg = _one_line(e)
    want_model = list(zfnet_demo().features[0].weight.shape)
    assert f"features.0.weight is [64, 3, 11, 11] in the file but [{', '.join(map(str, want_model))}] in the model" in msg
    assert "looks like alexnet" in msg and "1000 outputs" in msg


def test_checkpoint_with_the_right_keys_but_other_shapes(tmp_path):
    path = tmp_path / "r18_10.pt"
    torch.save({"state_dict": tvm.resnet18(num_classes=10).state_dict()}, path)
    with pytest.raises(DeconvisError) as e:
        load_model("resnet18", str(path))
    msg = _one_line(e)
    assert "fc.weight is [10, 512] in the file but [1000, 512] in the model" in msg
    assert "looks like resnet18" in msg and "10 outputs" in msg


def test_checkpoint_missing_keys_says_what_the_file_is(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(tvm.resnet18().state_dict(), path)
    with pytest.raises(DeconvisError) as e:
        load_model("resnet34", str(path))
    msg = _one_line(e)
    assert "missing keys ['layer1.2." in msg and "looks like resnet18" in msg


class _Evil:  # any non-tensor object makes torch.load(weights_only=True) refuse the file
    pass


def test_unsafe_checkpoint_is_refused_without_weights_only_false_advice(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": zfnet_demo().state_dict(), "extra": _Evil()}, path)
    with pytest.raises(DeconvisError) as e:
        load_model("zfnet_demo", str(path))
    msg = _one_line(e)
    assert "holds a Python object (test_models._Evil)" in msg and "state_dict()" in msg
    assert "weights_only" not in msg


def test_missing_and_unreadable_checkpoints(tmp_path):
    with pytest.raises(DeconvisError, match="does not exist"):
        load_model("zfnet_demo", str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DeconvisError) as e:
        load_model("zfnet_demo", str(bad))
    assert "cannot read checkpoint" in _one_line(e)
