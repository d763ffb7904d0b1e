"""The demo net: shapes, deterministic init, a chain the deconvnet mirrors exactly, the shipped
checkpoint, and the training command (checkpoint format, resume)."""
from __future__ import annotations

import os

import pytest
import torch

from autograd_oracle import oracle_project
from deconvis.mirror.deconvnet import DeconvNet
from deconvis.training.demo_model import DEMO_INPUT_SIZE, DEMO_NUM_CLASSES, zfnet_demo
from deconvis.errors import DeconvisError
from deconvis.io.models import load_model

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deconvis", "assets",
                     "zfnet_demo.pt")


def test_forward_shapes_and_layout():
    m = zfnet_demo().eval()
    x = torch.randn(2, 3, *DEMO_INPUT_SIZE)
    assert m(x).shape == (2, DEMO_NUM_CLASSES)
    assert zfnet_demo(num_classes=7)(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    first = m.features[0]
    assert (first.kernel_size, first.stride) == ((7, 7), (2, 2))  # ZF's revised layer 1
    assert sum(isinstance(l, torch.nn.Conv2d) for l in m.features) == 5
    assert sum(p.numel() for p in m.parameters()) * 4 < 4 * 2**20  # a few MB as float32


def test_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = zfnet_demo(seed=3), zfnet_demo(seed=3), zfnet_demo(seed=4)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb), (_, vc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not torch.equal(a.features[0].weight, c.features[0].weight)


def test_init_biases_keep_conv2_to_conv5_alive():
    """conv1 (and the linears) start with zero bias, conv2..conv5 with a small positive one."""
    from deconvis.training.train import TrainConfig
    from deconvis.training.demo_model import DEMO_CONV_BIAS

    assert 0 < DEMO_CONV_BIAS <= 1
    convs = [l for l in zfnet_demo().features if isinstance(l, torch.nn.Conv2d)]
    assert torch.count_nonzero(convs[0].bias) == 0
    for c in convs[1:]:
        assert torch.equal(c.bias, torch.full_like(c.bias, DEMO_CONV_BIAS))
    zero = [l for l in zfnet_demo(conv_bias=0.0).features if isinstance(l, torch.nn.Conv2d)]
    assert all(torch.count_nonzero(c.bias) == 0 for c in zero)
    # weights do not depend on the bias choice
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(convs, zero))
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(ASSET)), "..", "configs", "train_demo.yaml")
    assert TrainConfig().conv_bias_init == DEMO_CONV_BIAS
    assert TrainConfig.load(cfg_path).conv_bias_init == DEMO_CONV_BIAS


@pytest.mark.skipif(not os.path.isfile(ASSET), reason="deconvis/assets/zfnet_demo.pt not built yet")
def test_shipped_checkpoint_has_few_dead_channels():
    """ZF Fig. 6: dead filters are a training defect. Over the demo image set, fewer than 10% of
    each layer's channels may never fire."""
    from deconvis.analysis.diagnose import channel_max, image_set_batches

    lm = load_model("zfnet_demo", ASSET)
    pp = lm.preprocess
    batches = image_set_batches("builtin:skimage-crops", pp.resize, pp.crop[0], batch_size=64,
                                mean=pp.mean, std=pp.std)
    mx = channel_max(lm.model, batches, [f"conv{i}" for i in range(1, 6)])
    for layer, v in mx.items():
        dead = int((v <= 0).sum())
        assert dead < 0.1 * len(v), f"{layer}: {dead}/{len(v)} channels dead"


def test_is_a_chain_the_deconvnet_mirrors_exactly():
    torch.manual_seed(1)
    m = zfnet_demo(num_classes=5).double().eval()
    dn = DeconvNet(m)
    assert [dn.display_name(l) for l in dn.conv_layers()] == [f"conv{i}" for i in range(1, 6)]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    dn.forward(x)
    for layer in ("conv2", "conv5"):
        name = dn.resolve(layer)
        units = dn.strongest(name, k=1)[:4]
        rec = dn.project(name, units)
        ref = oracle_project(m, x, name, units, "deconvnet")
        assert rec.abs().max() > 0
        torch.testing.assert_close(rec, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(not os.path.isfile(ASSET), reason="deconvis/assets/zfnet_demo.pt not built yet")
def test_shipped_checkpoint_loads_with_preprocess():
    assert os.path.getsize(ASSET) < 4 * 2**20
    lm = load_model("zfnet_demo", ASSET)
    assert lm.preprocess.crop == DEMO_INPUT_SIZE
    assert lm.preprocess.resize >= DEMO_INPUT_SIZE[0]
    assert not lm.model.training
    meta = torch.load(ASSET, map_location="cpu", weights_only=True)["deconvis"]
    assert meta["model"] == "zfnet_demo" and len(meta["classes"]) == DEMO_NUM_CLASSES
    assert meta["epoch"] >= 1 and meta["train"]["final_acc"] > 0.1
    fresh = zfnet_demo()
    assert not torch.equal(fresh.features[0].weight, lm.model.features[0].weight)  # trained, not init
    with torch.no_grad():
        out = lm.model(torch.randn(1, 3, *DEMO_INPUT_SIZE))
    assert out.shape == (1, DEMO_NUM_CLASSES) and torch.isfinite(out).all()


def _tiny_cfg(out_dir, **kw):
    from deconvis.training.train import TrainConfig

    base = dict(epochs=2, batch_size=4, num_classes=3, samples_per_class=4, image_size=64, val_samples=6,
                out_dir=str(out_dir), snapshot_epochs=[1, 2], layers=["conv1", "conv2"], features_per_layer=2,
                probe_images=3, threads=0, tile_size=16, lr=0.01)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_train_command_checkpoint_and_bitwise_resume(tmp_path):
    """A run interrupted after epoch 1 and resumed from train_state.pt ends bitwise equal to an
    uninterrupted run, and its evolution figures keep the first column."""
    from deconvis.training.train import train

    full = train(_tiny_cfg(tmp_path / "full"), log=lambda s: None)

    def stop_after_first_epoch(msg):
        if msg.startswith("epoch   1/"):
            raise KeyboardInterrupt

    part_cfg = _tiny_cfg(tmp_path / "part")
    with pytest.raises(KeyboardInterrupt):
        train(part_cfg, log=stop_after_first_epoch)
    assert not os.path.exists(tmp_path / "part" / "zfnet_demo.pt")
    resumed = train(part_cfg, log=lambda s: None)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    a = torch.load(full["checkpoint"], weights_only=True)
    b = torch.load(resumed["checkpoint"], weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    meta = a["deconvis"]
    assert meta["preprocess"]["crop"] == [64, 64] and meta["epoch"] == 2 and len(meta["classes"]) == 3
    st_full = torch.load(tmp_path / "full" / "snapshots.pt", weights_only=True)
    st_part = torch.load(tmp_path / "part" / "snapshots.pt", weights_only=True)
    assert [c["label"] for c in st_part["columns"]] == ["1", "2"]
    for cf, cp in zip(st_full["columns"], st_part["columns"]):
        for layer in cf["rec"]:
            assert torch.equal(cf["rec"][layer], cp["rec"][layer])
    assert os.path.isfile(tmp_path / "part" / "evolution_conv1.png")


def test_train_config_errors(tmp_path):
    from deconvis.training.train import TrainConfig

    with pytest.raises(DeconvisError, match="unknown key 'epoch'.*epochs"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(DeconvisError, match="strictly increasing"):
        _tiny_cfg(tmp_path, snapshot_epochs=[2, 1]).validate()
    with pytest.raises(DeconvisError, match="after the last epoch"):
        _tiny_cfg(tmp_path, snapshot_epochs=[1, 5]).validate()
    with pytest.raises(DeconvisError, match="must be an integer"):
        TrainConfig.from_dict({"epochs": "many"})
    cfg = TrainConfig.load(None, {"snapshot_epochs": "1,2", "epochs": "4", "tensorboard": "false", "lr": "0.1"})
    assert cfg.snapshot_epochs == [1, 2] and cfg.epochs == 4 and cfg.tensorboard is False and cfg.lr == 0.1
