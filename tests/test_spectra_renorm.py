"""Layer-1 spectra, layer-2 aliasing, dominating filters and ZF's filter renormalisation, each
against a numpy reference (explicit FFT loops, explicit RMS)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from deconvis.analysis.diagnose import diagnose, dominating, filter_rms
from deconvis.analysis.spectra import aliasing, band_fractions, power_spectrum, radial_profile
from deconvis.errors import DeconvisError
from deconvis.training.renorm import FilterRenorm, renormalise_filters


def test_power_spectrum_profile_and_bands_match_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 7, 7))
    n = 16
    p = power_spectrum(torch.from_numpy(w), n)
    for o in range(5):
        ref = sum(np.abs(np.fft.fft2(np.pad(w[o, c], ((0, n - 7), (0, n - 7))))) ** 2 for c in range(3))
        np.testing.assert_allclose(p[o], ref, rtol=1e-12)
    freq, prof = radial_profile(p)
    bands = band_fractions(p, (0.125, 0.25))
    for o in range(5):
        sums, counts = np.zeros(n // 2 + 1), np.zeros(n // 2 + 1)
        low = mid = high = 0.0
        for u in range(n):
            for v in range(n):
                fu, fv = (u if u <= n // 2 else u - n) / n, (v if v <= n // 2 else v - n) / n
                r = np.hypot(fu, fv)
                k = int(np.floor(r * n + 0.5))
                if k <= n // 2:
                    sums[k] += p[o, u, v]
                    counts[k] += 1
                if r < 0.125:
                    low += p[o, u, v]
                elif r < 0.25:
                    mid += p[o, u, v]
                else:
                    high += p[o, u, v]
        np.testing.assert_allclose(prof[o], sums / counts, rtol=1e-12)
        np.testing.assert_allclose(bands[o], np.array([low, mid, high]) / p[o].sum(), rtol=1e-12)
    np.testing.assert_allclose(freq, np.arange(n // 2 + 1) / n)


def test_aliasing_peaks_on_a_stride_lattice():
    rng = np.random.default_rng(1)
    n, s = 32, 4
    yy, xx = np.mgrid[0:n, 0:n]
    noise = rng.standard_normal((6, 1, n, n))
    grid = noise + 3.0 * ((yy % s == 0) & (xx % s == 0))[None, None]  # a stride-4 dot lattice
    a_noise = aliasing(torch.from_numpy(noise), s)
    a_grid = aliasing(torch.from_numpy(grid), s)
    assert 0.5 < a_noise.peak_ratio < 2.0 and 0.5 < a_noise.ratio < 2.0
    assert a_grid.peak_ratio > 3 and a_grid.ratio > 2
    # fraction against an explicit loop over the lattice bins (halfwidth 0: exact lattice points)
    a0 = aliasing(torch.from_numpy(grid), s, halfwidth=0)
    p = np.abs(np.fft.fft2(grid[:, 0])) ** 2
    lattice = [(a * n // s, b * n // s) for a in range(s) for b in range(s) if a or b]
    frac = [sum(p[i][u, v] for u, v in lattice) / (p[i].sum() - p[i][0, 0]) for i in range(6)]
    assert a0.fraction == pytest.approx(np.mean(frac), rel=1e-10)
    assert a0.white_fraction == pytest.approx(len(lattice) / (n * n - 1))
    assert a0.peak_ratio > 10 and a0.ratio > 10
    with pytest.raises(DeconvisError, match="divisible"):
        aliasing(torch.zeros(1, 1, 30, 30), 4)


def test_filter_rms_and_dominating():
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    w[4] *= 20
    rms = filter_rms(w)
    np.testing.assert_allclose(rms, [np.sqrt(np.mean(w[o].numpy() ** 2)) for o in range(6)], rtol=1e-12)
    assert dominating(rms, 3.0) == [4]
    with pytest.raises(DeconvisError):
        dominating(rms, 0)


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, padding=1), nn.ReLU()).double()


def test_diagnose_finds_planted_problems():
    m = _toy()
    with torch.no_grad():
        m[0].weight[2] *= 10      # dominating
        m[2].bias[1] = -1e6       # dead
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    res = diagnose(m, x, fft_size=16, alias_images=4)
    assert res.dead == {"conv1": [], "conv2": [1]}
    assert res.filters[0].dominating == [2] and res.filters[1].dominating == []
    np.testing.assert_allclose(res.band_fractions.sum(1), 1.0)
    assert res.stride == 2 and res.alias_layer == "conv2" and res.aliasing is not None
    assert res.aliasing.fraction > 0
    assert "conv2 | 1/4" in res.markdown()
    assert diagnose(m, x, fft_size=16, alias_images=4, alias_stride=4).aliasing.stride == 4
    with pytest.raises(DeconvisError, match="fft_size"):
        diagnose(m, x, fft_size=4)
    with pytest.raises(DeconvisError, match="conv9"):
        diagnose(m, x, layers=["conv9"])


def test_renormalise_matches_numpy_and_leaves_small_filters():
    m = _toy()
    with torch.no_grad():
        m[0].weight[1] *= 100
    before = {k: v.clone() for k, v in m.state_dict().items()}
    n = renormalise_filters(m, 0.1)
    for key in ("0.weight", "2.weight"):
        w0 = before[key].numpy()
        rms = np.sqrt((w0 ** 2).reshape(len(w0), -1).mean(1))
        expect = w0 * np.where(rms > 0.1, 0.1 / rms, 1.0)[:, None, None, None]
        np.testing.assert_allclose(m.state_dict()[key].numpy(), expect, rtol=1e-12)
    torch.testing.assert_close(m[0].bias, before["0.bias"])
    assert n == sum(int((filter_rms(before[k]) > 0.1).sum()) for k in ("0.weight", "2.weight")) and n >= 1
    assert filter_rms(m[0].weight).max() <= 0.1 + 1e-12
    cb = FilterRenorm(0.1, every_n_steps=2)
    assert cb.on_step_end(1, m) is None and cb.on_step_end(2, m) == 0
    with pytest.raises(DeconvisError):
        FilterRenorm(0.0)


def test_renorm_lightning_adapter(monkeypatch):
    class Callback:
        pass

    pkg, sub = types.ModuleType("lightning"), types.ModuleType("lightning.pytorch")
    sub.Callback = Callback
    pkg.pytorch = sub
    monkeypatch.setitem(sys.modules, "lightning", pkg)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", sub)
    import deconvis.training.lightning as dl

    monkeypatch.setattr(dl, "_RENORM_CLASS", None)
    cls = dl.FilterRenormLightningCallback
    assert issubclass(cls, Callback)
    holder = nn.Module()
    holder.net = _toy()
    with torch.no_grad():
        holder.net[0].weight.mul_(100)
    cb = cls(radius=0.1, model_attr="net")
    cb.on_train_batch_end(types.SimpleNamespace(global_step=1), holder, None, None, 0)
    assert filter_rms(holder.net[0].weight).max() <= 0.1 + 1e-12 and cb.renorm.rescaled >= 6
    with pytest.raises(DeconvisError, match="no attribute 'model'"):
        cls(model_attr="model").on_train_batch_end(types.SimpleNamespace(global_step=1), holder, None, None, 0)


@pytest.mark.slow  # ~12 s (Lightning import); the adapter logic is covered by the stand-in test above
def test_renorm_in_a_real_lightning_trainer(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    import deconvis.training.lightning as dl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(4, 2))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=5.0)  # big steps push filters past the radius

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g))
    cb = dl.FilterRenormLightningCallback(radius=0.05, model_attr="net")
    trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         accelerator="cpu")
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert cb.renorm.rescaled > 0
    assert filter_rms(module.net[0].weight).max() <= 0.05 + 1e-7


def test_plain_training_loop_renormalises(tmp_path):
    """deconvis.training.train with filter_radius: every conv filter ends at RMS <= the radius."""
    from deconvis.training.train import TrainConfig, train

    cfg = TrainConfig(epochs=1, batch_size=4, num_classes=2, samples_per_class=2, image_size=64, val_samples=0,
                      out_dir=str(tmp_path), snapshots=False, threads=0, filter_radius=0.02, conv1_sgd_lr=0.0)
    out = train(cfg, log=lambda s: None)
    state = torch.load(out["checkpoint"], weights_only=True)["state_dict"]
    convs = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    assert len(convs) == 5
    for k in convs:
        assert filter_rms(state[k]).max() <= 0.02 + 1e-7, k


def test_diagnose_on_a_graph_model():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.stem, self.r1 = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()
            self.c2, self.r2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.r1(self.stem(x))
            h = self.r2(self.c2(h) + h)
            return self.fc(h.mean((2, 3)))

    m = Residual().double()
    with torch.no_grad():
        m.c2.weight[3] *= 50
        m.stem.bias[0] = -1e6   # r1 channel 0 dead (and r2's channel 0 then sees only the conv path)
        m.c2.bias[2] = -1e6     # r2 channel 2 dead through the residual sum
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    res = diagnose(m, x, layers=["r1", "r2"], fft_size=8, alias_layer="r2", alias_images=3)
    with torch.no_grad():  # brute force on the modules themselves
        r1 = m.r1(m.stem(x))
        r2 = m.r2(m.c2(r1) + r1)
    dead = {name: [int(c) for c in torch.nonzero(a.amax((0, 2, 3)) <= 0).flatten()] for name, a in
            (("r1", r1), ("r2", r2))}
    assert 0 in dead["r1"] and 2 in dead["r2"] and len(dead["r2"]) < 4  # planted, and not everything
    assert res.dead == dead
    assert [f.module for f in res.filters] == ["stem", "c2"] and res.filters[1].dominating == [3]
    assert res.aliasing is not None and res.alias_layer == "r2"
