"""The Lightning adapter in a real ``lightning.pytorch.Trainer`` and TensorBoard logging read back
from the event files (both packages are in the test extras, so these run in the default suite)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from deconvis.training.snapshots import SnapshotCallback

pl = pytest.importorskip("lightning.pytorch")  # in the test extras; skips only outside them


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 2))


class _Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit(callbacks, module=None):
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 2, (8,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    module = module or _Module()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    return module


def test_lightning_trainer_takes_snapshots_and_leaves_training_unchanged(tmp_path):
    from deconvis.training.lightning import SnapshotLightningCallback

    probe = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    plain = _fit([])
    module = _Module()
    cb = SnapshotCallback(module.net, probe, ["1", "4"], features_per_layer=2, epochs=[1, 2], tile_size=8,
                          out_dir=str(tmp_path / "evo"), tensorboard=str(tmp_path / "tb"))
    _fit([SnapshotLightningCallback(cb, model_attr="net")], module)
    assert [c.label for c in cb.columns] == ["1", "2"]
    for k, v in plain.state_dict().items():  # the callback changed nothing in training
        assert torch.equal(v, module.state_dict()[k]), k
    # the epoch-2 column is the snapshot of the final weights, taken directly
    direct = SnapshotCallback(module.net, probe, ["1", "4"], features_per_layer=cb.features, epochs=[2], tile_size=8)
    col = direct.snapshot(epoch=2)
    for layer in ("1", "4"):
        assert torch.equal(col.rec[layer], cb.columns[1].rec[layer])
        assert torch.equal(col.units[layer], cb.columns[1].units[layer])
    # TensorBoard: the evolution figure of each snapshot, read back from the event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    name = cb.display["4"]
    assert f"deconvis/evolution/{name}" in tags["images"] and "deconvis/snapshot_seconds" in tags["scalars"]
    events = acc.Images(f"deconvis/evolution/{name}")
    assert [e.step for e in events] == [1, 2]
    last = cv2.imdecode(np.frombuffer(events[-1].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert np.array_equal(last, cb.figures["4"])
    assert [s.step for s in acc.Scalars("deconvis/snapshot_seconds")] == [1, 2]
