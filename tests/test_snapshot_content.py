"""What a feature-evolution snapshot holds, against independent computations: each
reconstruction tile is ``DeconvNet.project`` of the unit on its full probe image cut at the
unit's receptive-field box (from the RF table), each patch tile the direct crop of the probe
image; the rule changes the reconstructions; a resumed callback ends equal to an uninterrupted one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.graph.rf import receptive_fields
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.render.display import to_uint8
from deconvis.training.snapshots import SnapshotCallback

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
SIZE = 16
TILE = 8  # = the RF box of conv2 below, so tiles are the crops themselves (no resizing)


def _net(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 16, 3)).double().eval()


def _probe(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _argmax_unit(model: nn.Module, probe: torch.Tensor, layer: int, c: int):
    with torch.no_grad():
        act = model[:layer + 1](probe)[:, c]
    flat = int(torch.argmax(act.flatten()))  # first maximum: smallest image, then row-major
    n, rem = divmod(flat, act.shape[1] * act.shape[2])
    return n, divmod(rem, act.shape[2]), float(act.max())


@pytest.mark.parametrize("rule", ["deconvnet", "guided", "gradient"])
def test_tiles_are_the_projection_and_the_crop_under_the_rf_box(rule):
    model, probe = _net(), _probe()
    cb = SnapshotCallback(model, probe, ["4"], features_per_layer=6, select="first", epochs=[1], rule=rule,
                          tile_size=TILE, mean=MEAN, std=STD)
    col = cb.snapshot(epoch=1)
    row_table = receptive_fields(model, (SIZE, SIZE))["4"]
    shown = (probe * torch.tensor(STD, dtype=probe.dtype).view(1, 3, 1, 1)
             + torch.tensor(MEAN, dtype=probe.dtype).view(1, 3, 1, 1)).clamp(0, 1)
    dn = DeconvNet(model)
    n_clipped = 0
    for row in range(6):
        n, (y, x), value = _argmax_unit(model, probe, 4, row)
        assert col.units["4"][row].tolist() == [n, row, y, x]
        assert float(col.value["4"][row]) == pytest.approx(value, rel=1e-6)
        y0, y1, x0, x1 = row_table.box(y, x)
        assert col.boxes["4"][row].tolist() == [y0, y1, x0, x1] and (y1 - y0, x1 - x0) == (TILE, TILE)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, SIZE), max(x0, 0), min(x1, SIZE)
        n_clipped += (cy0, cy1, cx0, cx1) != (y0, y1, x0, x1)
        # reconstruction: the full-image projection, cut at the box (zero outside the image)
        dn.forward(probe[n:n + 1])
        full = dn.project("4", torch.tensor([[0, row, y, x]]), rule=rule)[0]
        cut = torch.zeros(3, TILE, TILE, dtype=full.dtype)
        cut[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = full[:, cy0:cy1, cx0:cx1]
        assert float(cut.abs().sum()) == pytest.approx(float(full.abs().sum()), rel=1e-9)  # nothing outside
        want_rec = to_uint8(cut[None].float())[0]
        assert np.abs(col.rec["4"][row].numpy().astype(int) - want_rec.astype(int)).max() <= 1
        # patch: the probe image in display values, mid-grey outside the image
        want = np.full((TILE, TILE, 3), 128, np.uint8)
        crop = shown[n, :, cy0:cy1, cx0:cx1].float().permute(1, 2, 0)
        want[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = (crop.double() * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(col.patch["4"][row].numpy(), want)
    assert n_clipped > 0  # some boxes ran past the border


def test_the_rule_changes_the_reconstructions_not_the_units():
    model, probe = _net(), _probe()
    cols = {r: SnapshotCallback(model, probe, ["4"], features_per_layer=6, select="first", epochs=[1], rule=r,
                                tile_size=TILE, mean=MEAN, std=STD).snapshot(epoch=1)
            for r in ("deconvnet", "guided", "gradient")}
    for a, b in (("deconvnet", "guided"), ("deconvnet", "gradient"), ("guided", "gradient")):
        assert torch.equal(cols[a].units["4"], cols[b].units["4"])
        assert torch.equal(cols[a].patch["4"], cols[b].patch["4"])
        assert not torch.equal(cols[a].rec["4"], cols[b].rec["4"]), (a, b)


def _perturb(model: nn.Module, epoch: int) -> None:
    with torch.no_grad():
        model[3].weight.add_(0.2 * torch.randn(model[3].weight.shape, generator=torch.Generator().manual_seed(epoch),
                                               dtype=model[3].weight.dtype))


def test_resumed_snapshots_equal_an_uninterrupted_run(tmp_path):
    kw = dict(layers=["1", "4"], features_per_layer=3, epochs=[1, 2, 3, 4], tile_size=TILE, mean=MEAN, std=STD)
    model = _net()
    full = SnapshotCallback(model, _probe(), out_dir=str(tmp_path / "full"), **kw)
    for epoch in range(1, 5):
        _perturb(model, epoch)
        full.on_epoch_end(epoch, model)
    model = _net()
    part = SnapshotCallback(model, _probe(), out_dir=str(tmp_path / "part"), **kw)
    for epoch in (1, 2):
        _perturb(model, epoch)
        part.on_epoch_end(epoch, model)
    del part  # interrupted; training resumes from its own checkpoint (here: the same weights)
    resumed = SnapshotCallback(model, _probe(), out_dir=str(tmp_path / "part"), **kw)
    for epoch in (3, 4):
        _perturb(model, epoch)
        resumed.on_epoch_end(epoch, model)
    assert [c.label for c in resumed.columns] == ["1", "2", "3", "4"]
    assert resumed.features == full.features
    for ca, cb in zip(full.columns, resumed.columns):
        for field in ("rec", "patch", "units", "boxes", "value"):
            for layer in ("1", "4"):
                assert torch.equal(getattr(ca, field)[layer], getattr(cb, field)[layer]), (ca.label, field, layer)
    for layer in full.figures:
        assert np.array_equal(full.figures[layer], resumed.figures[layer])
