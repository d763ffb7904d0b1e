"""Names a user can find in their own code: a function call is named by the module whose
``forward`` made it (``l2.relu``, ``l2.add``), in ``deconvis rf`` and everywhere the tracer's
names go; torch.fx's old names (``relu_4``) still resolve, with a note; unknown names get close
matches."""
from __future__ import annotations

import json
import logging
import textwrap

import pytest
import torch

from deconvis.cli import main
from deconvis.graph.trace import trace_graph
from deconvis.mirror.deconvnet import DeconvNet

# a residual net as a new user writes one: F.relu and the residual add inside Block.forward;
# l3 also holds an nn.ReLU named ``relu`` beside its F.relu calls (the names must not clash)
MODEL_PY = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c, own_relu=False):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1)
            self.relu = nn.ReLU() if own_relu else None

        def forward(self, x):
            y = F.relu(self.conv1(x))
            if self.relu is not None:
                y = self.relu(y)
            return F.relu(x + self.conv2(y))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.l1, self.l2, self.l3 = Block(4), Block(4), Block(4, own_relu=True)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = F.relu(self.stem(x))
            x = self.l3(self.l2(self.l1(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def make():
        torch.manual_seed(0)
        return Net()
''')


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "resnet_user.py"
    path.write_text(MODEL_PY)
    return f"{path}:make"


def _load(spec):
    from deconvis.io.models import build_model
    return build_model(spec)


def test_rf_names_functional_calls_by_their_block(model_file, capsys):
    assert main(["rf", "--model", model_file, "--input-size", "16", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert names == ["input", "stem", "relu",
                     "l1.conv1", "l1.relu", "l1.conv2", "l1.add", "l1.relu#2",
                     "l2.conv1", "l2.relu", "l2.conv2", "l2.add", "l2.relu#2",
                     "l3.conv1", "l3.relu", "l3.relu#2", "l3.conv2", "l3.add", "l3.relu#3",
                     "adaptive_avg_pool2d", "flatten", "fc"]
    assert len(set(names)) == len(names)


def test_old_fx_names_resolve_with_a_note(model_file, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="deconvis"):
        assert main(["rf", "--model", model_file, "--input-size", "16", "--json",
                     "--layer", "relu_4", "--layer", "add_1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["l2.relu#2", "l2.add"]
    notes = [r.getMessage() for r in caplog.records]
    assert any("'relu_4'" in m and "'l2.relu#2'" in m for m in notes)
    assert any("'add_1'" in m and "'l2.add'" in m for m in notes)


def test_unknown_name_gets_close_matches(model_file, capsys):
    assert main(["rf", "--model", model_file, "--input-size", "16", "--layer", "l2.rleu"]) == 2
    err = capsys.readouterr().err
    assert "unknown layer 'l2.rleu'" in err and "l2.relu" in err and err.count("\n") == 1


def test_projection_by_old_and_new_name_is_the_same(model_file):
    model = _load(model_file).double()
    dn = DeconvNet(model)
    assert "l2.relu#2" in dn.layer_names and not any(n.startswith("relu_") for n in dn.layer_names)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dn.forward(x)
    units = dn.strongest("l2.relu#2", 1)[:2]
    new = dn.project("l2.relu#2", units)
    old = dn.project("relu_4", units)
    assert dn.resolve("relu_4") == "l2.relu#2" and torch.equal(new, old)
    rec, _ = dn.project_window("l2.add", units)
    assert torch.isfinite(rec).all()


def test_module_call_repeats_keep_their_names():
    """torchvision ResNet: module calls keep ``layer1.0.relu#2`` (no functional op there)."""
    import torchvision

    tg = trace_graph(torchvision.models.resnet18())
    assert "layer1.0.relu#2" in tg.layer_names and "layer1.0.add" in tg.layer_names
    assert tg.resolve("add") == "layer1.0.add" and tg.resolve("add_7") == "layer4.1.add"
