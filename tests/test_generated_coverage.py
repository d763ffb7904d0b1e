"""The network generator (tests/netgen.py) shows its own coverage: over its draws, how often each
op and each named combination appeared; a tag that never appears fails. The engine tests
(tests/test_generated_*.py) assert the same over their own draws. Also: a drawn net is rebuilt
exactly from the call its repr prints, and the tags say what the net holds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import netgen

DRAWS, SLOW_DRAWS = 60, 600


def test_every_op_and_combination_is_drawn():
    counts = netgen.check_nets("coverage", lambda net: None, DRAWS)  # fails on a tag never drawn
    assert set(counts) <= netgen.OPS | netgen.COMBOS, set(counts) - (netgen.OPS | netgen.COMBOS)
    assert min(counts[t] for t in netgen.OPS | netgen.COMBOS) >= 1
    print("\n".join(f"{t:28s} {counts[t]:4d}" for t in sorted(counts, key=counts.get)))  # shown with -s


@pytest.mark.slow
def test_every_op_and_combination_is_drawn_often():
    counts = netgen.check_nets("coverage-slow", lambda net: None, SLOW_DRAWS)
    rare = {t: c for t, c in counts.items() if c < 10}
    assert not rare, f"drawn fewer than 10 times in {SLOW_DRAWS} nets: {rare}"


def test_rebuild_and_tags_tell_the_truth():
    """build(...) from a repr gives the same net; tags match the modules the net holds."""
    seen = {}

    def check(net: netgen.GenNet) -> None:
        again = eval("netgen." + net.call, {"netgen": netgen})
        assert repr(again) == repr(net)
        x = net.images(1)
        with torch.no_grad():
            assert torch.equal(again.model(x), net.model(x))
        mods = list(net.model.modules())
        assert ("batchnorm" in net.tags) == any(isinstance(m, nn.BatchNorm2d) for m in mods)
        assert ("layernorm" in net.tags) == any(isinstance(m, nn.LayerNorm) for m in mods)
        assert ("concat" in net.tags) == ("cat" in str(torch.fx.symbolic_trace(net.model).code))
        pools = [m for m in mods if isinstance(m, (nn.MaxPool2d, netgen.MaxPoolF))
                 and getattr(m, "kind", "max") == "max"]
        assert ("maxpool" in net.tags) == bool(pools)
        if "input_nonsquare" in net.tags:
            assert net.size[0] != net.size[1]
        netgen.count(seen, net)

    netgen.check_nets("rebuild", check, 20, want=())
