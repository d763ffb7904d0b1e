"""Feature visualisation by optimisation (deconvis.featvis): the parametrisation against
independent arithmetic, the transforms against exact shifts and rotations, the optimised images
against noise on the demo net and a torchvision net, batching, the model left alone, errors and
the ``deconvis featvis`` command."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from deconvis.cli import main
from deconvis.errors import DeconvisError
from deconvis.featvis import FourierParam, LayerObjective, visualize_channels
from deconvis.featvis import param as P
from deconvis.featvis import robust
from deconvis.featvis.run import FeatvisConfig, noise_objective

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEMO = os.path.join(ROOT, "deconvis", "assets", "zfnet_demo.pt")


@pytest.fixture(scope="module")
def demo():
    from deconvis.io.models import load_model

    return load_model("zfnet_demo", DEMO)


def small_net() -> nn.Module:
    """A chain with BN and dropout (modes matter), in float64."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 6, 5, stride=2, padding=2), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()


# ------------------------------------------------------------------------ parametrisation
@pytest.mark.parametrize("size, decorrelate", [((16, 16), True), ((15, 21), True), ((12, 9), False)])
def test_fourier_param_round_trips_a_known_image(size, decorrelate):
    """spectrum_of is the inverse of image: a photo-like image (smooth plus noise) comes back."""
    p = FourierParam(size, decorrelate=decorrelate, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size[0], dtype=torch.float64),
                            torch.linspace(0, 1, size[1], dtype=torch.float64), indexing="ij")
    smooth = torch.stack([yy, xx, (yy + xx) / 2])[None] * 0.8 + 0.1
    img = (smooth + 0.05 * torch.rand(2, 3, *size, generator=g, dtype=torch.float64)).clamp(0.02, 0.98)
    spec = p.spectrum_of(img)
    assert spec.shape == (2, *p.spectrum_shape)
    assert torch.allclose(p.image(spec), img, atol=1e-10, rtol=0)


def test_spectrum_scale_is_one_over_frequency():
    """Coefficient k of the (ortho) rfft2 of the image equals spectrum_k * max(f_k, 1/n)^-1 / 4, with
    f_k computed here from numpy's own frequency grid."""
    h, w = 12, 16
    p = FourierParam((h, w), decorrelate=False, dtype=torch.float64)
    spec = torch.randn(1, *p.spectrum_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    back = torch.fft.rfft2(p.logits(spec), norm="ortho") * P.FFT_DIVISOR
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.rfftfreq(w), indexing="ij")
    expect = torch.view_as_complex(spec) / torch.as_tensor(np.maximum(np.hypot(fy, fx), 1 / 16))
    inner = slice(1, w // 2)  # columns 0 and w/2 are Hermitian-constrained (imaginary part dropped)
    assert torch.allclose(back[..., inner], expect[..., inner], atol=1e-12)


def test_colour_statistics_are_the_imagenet_covariance():
    """White noise in the decorrelated space comes out with the ImageNet colour covariance
    (Lucid's square root S, normalised, gives S S^T); the factor is lower-triangular Cholesky."""
    s = P.COLOR_SQRT / np.max(np.linalg.norm(P.COLOR_SQRT, axis=0))
    cov = s @ s.T
    assert np.allclose(P.COLOR_CHOLESKY @ P.COLOR_CHOLESKY.T, cov, atol=1e-12)
    assert np.allclose(P.COLOR_CHOLESKY, np.tril(P.COLOR_CHOLESKY))
    p = FourierParam((64, 64), decay_power=0.0, dtype=torch.float64)  # flat spectrum: white pixels
    logits = p.logits(p.random(range(16), sd=1.0))
    pix = logits.permute(1, 0, 2, 3).reshape(3, -1).numpy()
    got = np.cov(pix)
    assert np.allclose(got / np.trace(got), cov / np.trace(cov), atol=0.01)
    flat = FourierParam((64, 64), decay_power=0.0, decorrelate=False, dtype=torch.float64)
    plain = np.cov(flat.logits(flat.random(range(16), sd=1.0)).permute(1, 0, 2, 3).reshape(3, -1).numpy())
    assert np.allclose(plain / np.trace(plain), np.eye(3) / 3, atol=0.01)


# ------------------------------------------------------------------------------ transforms
def test_transforms_shift_and_rotate_exactly():
    """An integer shift moves the pixels with a grey border; 90 degrees is rot90 (clockwise for
    positive angles as the image is shown, y down); the identity is a no-op."""
    img = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = robust.apply(img, robust.Jitter(dy=3, dx=-2))
    expect = torch.full_like(img, 0.5)
    expect[:, :, 3:, :8] = img[:, :, :7, 2:]
    assert torch.allclose(out, expect, atol=1e-12)
    rot = robust.apply(img, robust.Jitter(angle=90.0))
    assert torch.allclose(rot, torch.rot90(img, k=-1, dims=(2, 3)), atol=1e-12)
    assert robust.apply(img, robust.Jitter()) is img
    zoom = robust.apply(img, robust.Jitter(scale=2.0))
    assert torch.allclose(zoom[:, :, 4:6, 4:6].mean(dim=(2, 3)), img[:, :, 4:6, 4:6].mean(dim=(2, 3)), atol=0.2)


def test_draws_cover_the_ranges_and_repeat_with_the_seed():
    gen = torch.Generator().manual_seed(5)
    draws = [robust.draw(gen, 3, 0.1, 10.0) for _ in range(400)]
    assert {d.dy for d in draws} == set(range(-3, 4)) and {d.dx for d in draws} == set(range(-3, 4))
    assert all(0.9 <= d.scale <= 1.1 and -10 <= d.angle <= 10 for d in draws)
    again = torch.Generator().manual_seed(5)
    assert [robust.draw(again, 3, 0.1, 10.0) for _ in range(400)] == draws


# -------------------------------------------------------------------------- the objective
def test_layer_output_is_the_module_output(demo):
    """The truncated graph gives what a forward hook on the module sees: conv5 is the ReLU after
    features.10, its pre-activation the conv itself."""
    model = demo.model
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    seen = {}
    hooks = [model.features[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
             for i in (10, 11)]
    try:
        with torch.no_grad():
            model((x - torch.tensor(demo.preprocess.mean).view(1, 3, 1, 1)) / torch.tensor(demo.preprocess.std).view(1, 3, 1, 1))
    finally:
        for h in hooks:
            h.remove()
    obj = LayerObjective(model, "conv5", mean=demo.preprocess.mean, std=demo.preprocess.std)
    assert obj.layer == "features.11" and obj.label == "conv5"
    with torch.no_grad():
        assert torch.allclose(obj.output(x), seen[11], atol=1e-5)
        assert torch.allclose(obj.output(x, pre=True), seen[10], atol=1e-5)
        s = obj.score(x, [4, 2], unit=(1, 2))
        assert torch.allclose(s, torch.stack([seen[11][0, 4, 1, 2], seen[11][1, 2, 1, 2]]))
        assert torch.allclose(obj.score(x, [4, 2]), torch.stack([seen[11][0, 4].mean(), seen[11][1, 2].mean()]))


# -------------------------------------------------------------------- optimised vs noise
def test_optimised_images_beat_noise_on_the_demo_net(demo):
    pp = demo.preprocess
    chans = [0, 2, 4, 5]
    obj = LayerObjective(demo.model, "conv5", mean=pp.mean, std=pp.std)
    res = visualize_channels(demo.model, "conv5", chans, steps=40, size=64, lr=0.1, objective=obj)
    noise = noise_objective(obj, chans, (64, 64), None)
    assert res.images.shape == (4, 3, 64, 64) and 0 < res.images.min() and res.images.max() < 1
    assert res.channels == chans and res.history.shape == (40, 4)
    assert (res.objective > noise + 0.2).all()
    assert res.objective.sum() > 10 * noise.sum()
    # one unit at (y, x): that unit rises well above its value on noise
    unit = visualize_channels(demo.model, "conv5", [5], unit=(1, 1), steps=40, size=64, lr=0.1, objective=obj)
    assert unit.objective[0] > noise_objective(obj, [5], (64, 64), (1, 1))[0] + 1.0


def test_optimised_images_beat_noise_on_a_torchvision_resnet():
    """resnet18, random weights, the container layer2 (a non-chain graph). Random weights answer
    uniform noise strongly already; the optimised image still goes well past it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    obj = LayerObjective(model, "layer2")
    assert obj.layer == obj.traced.resolve("layer2") and obj.pre_sub is not None
    res = visualize_channels(model, "layer2", [3, 7], steps=40, size=48, lr=0.2, objective=obj)
    noise = noise_objective(obj, [3, 7], (48, 48), None)
    assert (res.objective > 1.4 * noise).all() and (res.objective > 5 * res.history[0].abs()).all()


def test_batched_equals_per_channel():
    """Channel c's image depends on (seed, c) only: one batch of three, batches of two and one at a
    time give the same images (float64); another seed gives other images."""
    model = small_net()
    kw = dict(steps=6, size=24, lr=0.1, seed=7)
    together = visualize_channels(model, "4", [5, 1, 6], batch=3, **kw)
    pairs = visualize_channels(model, "4", [5, 1, 6], batch=2, **kw)
    alone = [visualize_channels(model, "4", [c], batch=1, **kw) for c in (5, 1, 6)]
    assert torch.allclose(together.images, pairs.images, atol=1e-9, rtol=0)
    assert torch.allclose(together.images, torch.cat([a.images for a in alone]), atol=1e-9, rtol=0)
    assert torch.allclose(together.objective, torch.cat([a.objective for a in alone]), atol=1e-9)
    other = visualize_channels(model, "4", [5], batch=1, **{**kw, "seed": 8})
    assert not torch.allclose(other.images, alone[0].images, atol=1e-3)


def test_model_is_left_alone():
    """Modes, parameters, buffers (BN running stats), requires_grad and .grad are as before; no
    hook remains."""
    model = small_net().train()
    model[4].weight.requires_grad_(False)
    model[6].eval()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    visualize_channels(model, "conv2", [0, 3], steps=3, size=24)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(layer="conv9"), "unknown layer 'conv9'.*conv2"),
    (dict(channels=[8]), "channel 8 is out of range for layer 'conv2' with 8 channels"),
    (dict(channels=[-1]), "channel -1 is out of range"),
    (dict(unit=(12, 0)), r"unit \(12, 0\) is outside the 6x6 map of layer 'conv2' at 24x24 px"),
    (dict(layer="9", unit=(0, 0)), "outputs vectors"),
    (dict(steps=0), "steps=0 must be"),
    (dict(size=0), "image size"),
])
def test_bad_input_is_a_one_line_error(kwargs, match):
    args = dict(layer="conv2", channels=[0], steps=2, size=24)
    args.update(kwargs)
    with pytest.raises(DeconvisError, match=match) as info:
        visualize_channels(small_net(), args.pop("layer"), args.pop("channels"), **args)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------- CLI
def test_yaml_keys_are_the_flags():
    path = os.path.join(ROOT, "configs", "featvis.yaml")
    with open(path) as f:
        keys = set(yaml.safe_load(f))
    assert keys == {f.name for f in dataclasses.fields(FeatvisConfig)}
    shipped = FeatvisConfig.load(path).to_dict()
    default = FeatvisConfig.load(None).to_dict()
    assert shipped == default and default["out_dir"] == os.path.join("outputs", "featvis-zfnet_demo-conv5")


def test_featvis_cli_writes_pngs_and_json(tmp_path, capsys):
    from deconvis.io.images import read_image

    out = tmp_path / "fv"
    rc = main(["featvis", "--config", os.path.join(ROOT, "configs", "featvis.yaml"), "--layer", "conv2",
               "--channels", "3,1", "--steps", "3", "--size", "40", "--out-dir", str(out), "--threads", "1"])
    assert rc == 0
    rec = json.loads((out / "featvis.json").read_text())
    assert rec["label"] == "conv2" and rec["layer"] == "features.4" and rec["size"] == [40, 40]
    assert [c["channel"] for c in rec["channels"]] == [3, 1]
    assert all(len(c["curve"]) == 3 and "noise_objective" in c for c in rec["channels"])
    assert rec["settings"]["steps"] == 3 and rec["config"]["layer"] == "conv2"
    for c in rec["channels"]:
        assert read_image(str(out / c["png"])).shape == (40, 40, 3)
    assert read_image(str(out / "sheet.png")).shape == (40, 82, 3)
    assert not [p for p in os.listdir(out) if p.startswith(".") or p.endswith(".tmp")]
    assert "conv2 (features.4): 2 channels at 40x40 px" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--layer", "conv7"], "unknown layer 'conv7'"),
    (["--channels", "64"], "channel 64 is out of range for layer 'conv5' with 64 channels"),
    (["--unit", "1"], "unit '1' must be two integers"),
    (["--scale", "1.5"], r"scale 1.5 must be in \[0, 1\)"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, match):
    import re

    rc = main(["featvis", "--steps", "1", "--size", "32", "--out-dir", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and re.search(match, err)
