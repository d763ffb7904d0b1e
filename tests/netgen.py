"""Random small traceable CNNs for the generated-network tests (hypothesis strategies).

:func:`nets` draws a float64 network of a few blocks (each built from what the engines claim to
support: docs/method.md and CONTRIBUTING.md "Adding support for a new layer type") for a 16-40 px
input, square or not, with random weights, biases and BatchNorm running statistics. Every drawn
:class:`GenNet` records ``tags``: the ops and named combinations it contains, so a test can count
its coverage (:func:`covered`). Failures shrink to a small net; ``repr`` prints its blocks.

A new supported layer type joins this generator (a block or a variant with its tag in ``OPS``),
and every generated-network test then checks it on every engine.
"""
from __future__ import annotations

import contextlib
import random
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st
from torch import nn

DT = torch.float64

# every op tag a drawn net can carry; the coverage tests fail when one never appears
OPS = frozenset({
    "conv", "conv_groups", "conv_depthwise", "conv_dilation", "conv_stride", "conv_stride_asym",
    "conv_kernel_nonsquare", "conv_pad_asym", "conv_nobias", "pad_module", "pad_functional",
    "maxpool", "maxpool_functional", "maxpool_ceil", "maxpool_padding", "maxpool_overlap", "maxpool_dilation",
    "avgpool", "avgpool_functional", "avgpool_ceil", "avgpool_padding", "avgpool_exclude_pad",
    "batchnorm", "lrn", "lrn_functional",
    "relu", "relu6", "leaky_relu", "prelu", "prelu_shared", "silu", "gelu", "hardswish", "sigmoid",
    "act_module", "act_functional", "act_method", "act_inplace",
    "se_torchvision", "se_hand", "residual", "residual_projection", "concat", "chunk", "shuffle",
    "channels_last", "layernorm", "linear_per_position",
    "dropout", "dropout2d", "dropout_functional",
    "global_avgpool", "global_maxpool", "global_mean", "flatten", "flatten_map", "linear_head", "fc_hidden",
    "input_nonsquare",
})
# named combinations (what sits next to what); also counted by the coverage tests
COMBOS = frozenset({
    "maxpool_after_non_relu",     # a max-pool that sees negative values (padding must act as -inf)
    "conv_bn_act",                 # the usual conv -> BN -> activation
    "depthwise_pointwise",         # MobileNet: depthwise conv, then a 1x1 conv
    "se_in_residual",              # EfficientNet / RegNetY: a gate inside a residual branch
    "concat_then_shuffle",         # ShuffleNet
    "channels_last_residual",      # ConvNeXt: channels-last MLP added to its input
    "strided_residual",            # a downsampling residual with a projection shortcut
    "pool_ceil_nonsquare",         # ceil-mode pooling on a non-square map
    "conv_after_se",               # something local after a gate that sees the whole image
    "inplace_after_add",           # an in-place activation on a residual sum
})


@dataclass
class GenNet:
    """A drawn network: ``model`` (float64, eval), its input ``size`` (h, w) pixels and
    ``in_ch`` channels, ``tags`` (ops and combinations), ``probes`` (module names whose output
    the tests project, in execution order), ``classes`` (width of the head, 0 without one),
    ``spec`` (one line per block, for the failure report), ``seed`` (of its weights) and
    ``call`` (the :func:`build` call that rebuilds it)."""

    model: nn.Module
    size: Tuple[int, int]
    in_ch: int
    tags: FrozenSet[str]
    probes: List[str]
    classes: int
    spec: List[str] = field(default_factory=list)
    seed: int = 0
    call: str = ""

    def __repr__(self) -> str:
        blocks = "\n    ".join(self.spec)
        return f"GenNet(size={self.size}, in_ch={self.in_ch}, rebuild=netgen.{self.call}, blocks=[\n    {blocks}])"

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis prints failing examples with this
        p.text(repr(self))

    def images(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` random float64 images [n, in_ch, h, w]."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.in_ch, *self.size, generator=g, dtype=DT)


# ------------------------------------------------------------------------------ activations
ACT_KINDS = ("relu", "relu6", "leaky_relu", "prelu", "silu", "gelu", "hardswish", "sigmoid")
_INPLACE_OK = {"relu", "relu6", "leaky_relu", "silu", "hardswish"}


class Act(nn.Module):
    """One activation ``kind`` in a ``style``: ``module``, ``functional``, ``method`` (tensor
    method or torch.*), ``inplace`` (module with inplace=True, or an in-place function/method)."""

    def __init__(self, kind: str, style: str, channels: int, slope: float, variant: int, gen: torch.Generator):
        super().__init__()
        self.kind, self.style, self.slope, self.variant = kind, style, slope, variant
        inplace = style == "inplace" and variant % 2 == 0  # inplace: module (even) or function (odd)
        if kind == "prelu":
            n = 1 if variant % 2 else channels
            self.m = nn.PReLU(n)
            with torch.no_grad():
                self.m.weight.copy_(torch.rand(n, generator=gen, dtype=DT) * 0.6 - 0.2)
        elif style in ("module", "inplace") and (style == "module" or inplace):
            self.m = {"relu": lambda: nn.ReLU(inplace), "relu6": lambda: nn.ReLU6(inplace),
                      "leaky_relu": lambda: nn.LeakyReLU(slope, inplace), "silu": lambda: nn.SiLU(inplace),
                      "gelu": lambda: nn.GELU(approximate="tanh" if variant % 2 else "none"),
                      "hardswish": lambda: nn.Hardswish(inplace), "sigmoid": nn.Sigmoid}[kind]()
        else:
            self.m = None

    def forward(self, x):
        k, s = self.kind, self.style
        if k == "prelu":
            return self.m(x) if s == "module" else F.prelu(x, self.m.weight)
        if self.m is not None:
            return self.m(x)
        if s == "inplace":
            if k == "relu":
                return (lambda t: t.relu_(), lambda t: torch.relu_(t), lambda t: F.relu(t, inplace=True))[self.variant % 3](x)
            if k == "relu6":
                return F.relu6(x, inplace=True)
            if k == "leaky_relu":
                return F.leaky_relu(x, self.slope, inplace=True)
            if k == "silu":
                return F.silu(x, inplace=True)
            return F.hardswish(x, inplace=True)
        if s == "method":
            if k == "relu":
                return x.relu() if self.variant % 2 else torch.relu(x)
            if k == "sigmoid":
                return x.sigmoid() if self.variant % 2 else torch.sigmoid(x)
        if k == "relu":
            return F.relu(x)
        if k == "relu6":
            return F.relu6(x)
        if k == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if k == "silu":
            return F.silu(x)
        if k == "gelu":
            return F.gelu(x, approximate="tanh" if self.variant % 2 else "none")
        if k == "hardswish":
            return F.hardswish(x)
        return torch.sigmoid(x)


def _act_tags(kind: str, style: str) -> Set[str]:
    tags = {kind, "act_" + style}
    return tags


def activation(r: "Pick", channels: int, gen: torch.Generator, fresh: bool = True, kinds=ACT_KINDS,
               inplace: bool = False) -> Tuple[Act, Set[str], str]:
    """An activation drawn with ``r``; in-place styles only when its input is a fresh tensor (``fresh``)."""
    kind = r.choice((kinds))
    styles = ["module", "functional"]
    if kind in ("relu", "sigmoid"):
        styles.append("method")
    if fresh and kind in _INPLACE_OK:
        styles.append("inplace")
    style = "inplace" if inplace and "inplace" in styles else r.choice(styles)
    slope = r.choice(([0.01, 0.2]))
    variant = r.randint((0, 5))
    act = Act(kind, style, channels, slope, variant, gen)
    tags = _act_tags(kind, style)
    if kind == "prelu" and variant % 2:
        tags.add("prelu_shared")
    return act, tags, f"{kind}/{style}/v{variant}"


def _randomise_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.3)
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=gen, dtype=DT) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=DT) * 0.2)


# ----------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    """A block's output goes through ``tap`` (an nn.Identity, a probe point) when it has one."""

    def __init__(self, tap: bool):
        super().__init__()
        self.tap = nn.Identity() if tap else None

    def out(self, y):
        return self.tap(y) if self.tap is not None else y


class ConvBlock(Block):
    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], act: Optional[Act], tap: bool):
        super().__init__(tap)
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        return self.out(y)


class Wrap(Block):
    """One module or function ``fn`` applied to the signal."""

    def __init__(self, fn: Callable, tap: bool, module: Optional[nn.Module] = None):
        super().__init__(tap)
        self.m = module
        self.fn = fn

    def forward(self, x):
        return self.out(self.m(x) if self.m is not None else self.fn(x))


class MaxPoolF(nn.Module):
    """Functional max/avg pool (the call is an fx function node, not a module)."""

    def __init__(self, kind: str, k, s, p, d, ceil: bool, include_pad: bool = True):
        super().__init__()
        self.kind, self.k, self.s, self.p, self.d, self.ceil, self.include_pad = kind, k, s, p, d, ceil, include_pad

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, self.k, self.s, self.p, self.d, ceil_mode=self.ceil)
        return F.avg_pool2d(x, self.k, self.s, self.p, ceil_mode=self.ceil, count_include_pad=self.include_pad)


class PoolBlock(Block):
    def __init__(self, pool: nn.Module, tap: bool):
        super().__init__(tap)
        self.pool = pool

    def forward(self, x):
        return self.out(self.pool(x))


class HandSE(Block):
    """x * sigmoid(fc2(relu(fc1(mean(x))))) (or hardsigmoid, as MobileNetV3)."""

    def __init__(self, c: int, sq: int, variant: int, tap: bool):
        super().__init__(tap)
        self.fc1, self.fc2 = nn.Conv2d(c, sq, 1), nn.Conv2d(sq, c, 1)
        self.variant = variant

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.variant % 2 else F.adaptive_avg_pool2d(x, 1)
        s = self.fc2(F.relu(self.fc1(s)))
        s = F.hardsigmoid(s) if self.variant >= 2 else torch.sigmoid(s)
        return self.out(x * s)


class TvSE(Block):
    def __init__(self, c: int, sq: int, silu: bool, tap: bool):
        super().__init__(tap)
        self.se = torchvision.ops.SqueezeExcitation(c, sq, activation=nn.SiLU if silu else nn.ReLU)

    def forward(self, x):
        return self.out(self.se(x))


class Residual(Block):
    """act(branch(x) + shortcut(x)); branch: conv -> [bn] -> act -> [se] -> conv [-> bn]."""

    def __init__(self, body: nn.ModuleList, shortcut: Optional[nn.Module], act: Act, tap: bool):
        super().__init__(tap)
        self.body, self.shortcut, self.act = body, shortcut, act

    def forward(self, x):
        y = x
        for m in self.body:
            y = m(y)
        s = self.shortcut(x) if self.shortcut is not None else x
        return self.out(self.act(y + s))


class Concat(Block):
    def __init__(self, branches: nn.ModuleList, tap: bool):
        super().__init__(tap)
        self.branches = branches

    def forward(self, x):
        return self.out(torch.cat([b(x) for b in self.branches], 1))


class Shuffle(Block):
    def __init__(self, groups: int, variant: int, tap: bool):
        super().__init__(tap)
        self.groups, self.variant = groups, variant

    def forward(self, x):
        if self.variant % 2:
            n, c, h, w = x.size()
            x = x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        else:
            x = x.reshape(x.shape[0], self.groups, -1, x.shape[2], x.shape[3]).transpose(1, 2)
            x = torch.flatten(x, 1, 2)
        return self.out(x)


class ShuffleUnit(Block):
    def __init__(self, branch: nn.Module, variant: int, tap: bool):
        super().__init__(tap)
        self.branch, self.variant = branch, variant

    def forward(self, x):
        a, b = x.chunk(2, dim=1) if self.variant else torch.chunk(x, 2, 1)
        y = torch.cat((a, self.branch(b)), 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.out(y)


class Mobile(Block):
    def __init__(self, body: nn.Sequential, residual: bool, tap: bool):
        super().__init__(tap)
        self.body, self.residual = body, residual

    def forward(self, x):
        y = self.body(x)
        return self.out(x + y if self.residual else y)


class ChannelsLast(Block):
    """ConvNeXt-style: permute to [N, H, W, C], LayerNorm over C, Linear, GELU, Linear, permute
    back; added to the input when ``residual``."""

    def __init__(self, c: int, hidden: int, residual: bool, functional_ln: bool, tap: bool):
        super().__init__(tap)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, hidden), nn.Linear(hidden, c)
        self.act = nn.GELU()
        self.residual, self.functional_ln = residual, functional_ln

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        if self.functional_ln:
            y = F.layer_norm(y, (y.shape[-1],), self.norm.weight, self.norm.bias, 1e-6)
        else:
            y = self.norm(y)
        y = self.fc2(self.act(self.fc1(y)))
        y = y.permute(0, 3, 1, 2)
        return self.out(x + y if self.residual else y.contiguous())  # contiguous: a later view works


class DropoutF(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class Head(nn.Module):
    """[global pool] -> flatten -> [Linear -> ReLU -> Dropout] -> Linear; ``pool`` is one of
    ``avg_module``, ``avg_functional``, ``max_module``, ``mean``, ``none`` (flatten the map)."""

    def __init__(self, c: int, hw: Tuple[int, int], pool: str, flat: int, hidden: int, classes: int):
        super().__init__()
        self.pool_kind, self.flat = pool, flat
        self.pool = {"avg_module": nn.AdaptiveAvgPool2d(1), "max_module": nn.AdaptiveMaxPool2d((1, 1))}.get(pool)
        self.flatten = nn.Flatten() if flat == 1 else None
        feat = c if pool != "none" else c * hw[0] * hw[1]
        self.fc1 = nn.Linear(feat, hidden) if hidden else None
        self.relu = nn.ReLU() if hidden else None
        self.drop = nn.Dropout(0.3) if hidden else None
        self.fc = nn.Linear(hidden or feat, classes)

    def forward(self, x):
        if self.pool is not None:
            x = self.pool(x)
        elif self.pool_kind == "avg_functional":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.pool_kind == "mean":
            x = x.mean((2, 3), keepdim=True)
        if self.flatten is not None:
            x = self.flatten(x)
        elif self.flat == 2:
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(x, 1)
        if self.fc1 is not None:
            x = self.drop(self.relu(self.fc1(x)))
        return self.fc(x)


class Net(nn.Module):
    def __init__(self, blocks: List[nn.Module], head: Optional[Head]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.head is not None:
            x = self.head(x)
        return x


# -------------------------------------------------------------------------------- strategy
BLOCK_KINDS = ("conv", "act", "maxpool", "avgpool", "bn", "residual", "concat", "se", "lrn", "pad",
               "shuffle", "channels_last", "dropout", "mobile")


def _out_hw(m: nn.Module, c: int, hw: Tuple[int, int]) -> Tuple[int, int, int]:
    with torch.no_grad():
        y = m.eval()(torch.zeros(1, c, *hw, dtype=DT))
    return int(y.shape[1]), int(y.shape[2]), int(y.shape[3])


class _Builder:
    def __init__(self, r: "Pick", gen: torch.Generator, c: int, hw: Tuple[int, int]):
        self.r, self.gen, self.c, self.hw = r, gen, c, hw
        self.tags: Set[str] = set()
        self.spec: List[str] = []
        self.blocks: List[nn.Module] = []
        self.last_kind = "input"       # what produced the current signal (for the combination tags)
        self.after_se = False

    def tap(self) -> bool:
        return self.r.coin()

    def add(self, block: nn.Module, kind: str, desc: str, tags: Iterable[str]) -> None:
        i = len(self.blocks)
        c, h, w = _out_hw(block, self.c, self.hw)
        self.blocks.append(block)
        self.tags |= set(tags)
        if self.after_se and kind in ("conv", "residual", "concat", "maxpool", "avgpool"):
            self.tags.add("conv_after_se")
        self.spec.append(f"{i}: {desc} -> [{c}, {h}, {w}]")
        self.c, self.hw = c, (h, w)
        self.last_kind = kind

    # -- pieces --------------------------------------------------------------------------
    def conv(self, cin: int, cout: Optional[int] = None, same: bool = False, stride_ok: bool = True
             ) -> Tuple[nn.Conv2d, Set[str], str]:
        r = self.r
        tags = {"conv"}
        h, w = self.hw
        if cout is None:
            cout = r.choice(([2, 3, 4, 6, 8]))
        divs = [g for g in range(1, min(cin, cout) + 1) if cin % g == 0 and cout % g == 0]
        groups = r.choice((divs))
        if groups > 1:
            tags.add("conv_depthwise" if groups == cin else "conv_groups")
        if same:
            k = r.choice(([1, 3, 5]))
            kh = kw = k
            dil = r.randint((1, 2)) if k > 1 else 1
            ph = pw = dil * (k - 1) // 2
            sh = sw = 1
        else:
            kh, kw = r.randint((1, 5)), r.randint((1, 5))
            dil = r.randint((1, 2))
            ph, pw = r.randint((0, kh - 1)), r.randint((0, kw - 1))
            sh = r.randint((1, 2)) if stride_ok and h >= 10 else 1
            sw = r.randint((1, 2)) if stride_ok and w >= 10 else 1
            # keep at least 3 output positions per axis
            while dil > 1 and (h + 2 * ph - dil * (kh - 1) < 5 or w + 2 * pw - dil * (kw - 1) < 5):
                dil -= 1
            kh = max(1, min(kh, h + 2 * ph - 2))
            kw = max(1, min(kw, w + 2 * pw - 2))
            ph, pw = min(ph, max(kh - 1, 0)), min(pw, max(kw - 1, 0))
            if h + 2 * ph - dil * (kh - 1) < 1 or w + 2 * pw - dil * (kw - 1) < 1:
                kh = kw = dil = 1
        if kh != kw:
            tags.add("conv_kernel_nonsquare")
        if ph != pw:
            tags.add("conv_pad_asym")
        if dil > 1:
            tags.add("conv_dilation")
        if sh > 1 or sw > 1:
            tags.add("conv_stride")
        if sh != sw:
            tags.add("conv_stride_asym")
        bias = r.coin()
        if not bias:
            tags.add("conv_nobias")
        conv = nn.Conv2d(cin, cout, (kh, kw), (sh, sw), (ph, pw), dil, groups, bias=bias)
        return conv, tags, f"conv {cin}->{cout} k{kh}x{kw} s{sh}x{sw} p{ph}x{pw} d{dil} g{groups} bias={bias}"

    def act(self, c: int, fresh: bool = True, kinds=ACT_KINDS) -> Tuple[Act, Set[str], str]:
        return activation(self.r, c, self.gen, fresh, kinds)

    def bn(self, c: int) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(c)
        _randomise_bn(bn, self.gen)
        return bn

    # -- blocks --------------------------------------------------------------------------
    def block(self, kind: str) -> None:
        c, (h, w) = self.c, self.hw
        if kind in ("maxpool", "avgpool") and min(h, w) < 4:
            kind = "conv"
        if kind == "shuffle" and c % 2:
            kind = "conv"
        getattr(self, "b_" + kind)()

    def b_conv(self) -> None:
        r = self.r
        conv, tags, desc = self.conv(self.c)
        bn = self.bn(conv.out_channels) if r.coin() else None
        act = None
        if r.coin():
            act, atags, adesc = self.act(conv.out_channels, fresh=True)
            tags |= atags
            desc += " " + adesc
        if bn is not None:
            tags.add("batchnorm")
            desc += " bn"
            if act is not None:
                tags.add("conv_bn_act")
        if self.last_kind == "depthwise" and conv.kernel_size == (1, 1):
            tags.add("depthwise_pointwise")
        self.add(ConvBlock(conv, bn, act, self.tap()), "conv", desc, tags)
        if "conv_depthwise" in tags:
            self.last_kind = "depthwise"

    def b_act(self) -> None:
        act, tags, desc = self.act(self.c, fresh=False)
        self.add(Wrap(None, self.tap(), act), "act:" + act.kind, desc, tags)

    def _pool_common(self, kind: str):
        r = self.r
        h, w = self.hw
        kh = r.randint((2, min(4, h)))
        kw = kh if r.coin() else r.randint((2, min(4, w)))
        sh, sw = r.randint((1, kh)), r.randint((1, kw))
        ph, pw = r.randint((0, kh // 2)), r.randint((0, kw // 2))
        ceil = r.coin()
        return (kh, kw), (sh, sw), (ph, pw), ceil

    def b_maxpool(self) -> None:
        r = self.r
        k, s, p, ceil = self._pool_common("max")
        dil = (1, 1)
        if r.coin() and min(self.hw) >= 12:
            dil = (2, r.randint((1, 2)))
            p = (min(p[0], k[0] // 2), min(p[1], k[1] // 2))
        functional = r.coin()
        pool = MaxPoolF("max", k, s, p, dil, ceil) if functional else nn.MaxPool2d(k, s, p, dil, ceil_mode=ceil)
        tags = {"maxpool"}
        if functional:
            tags.add("maxpool_functional")
        if ceil:
            tags.add("maxpool_ceil")
            if self.hw[0] != self.hw[1] or k[0] != k[1]:
                tags.add("pool_ceil_nonsquare")
        if p != (0, 0):
            tags.add("maxpool_padding")
        if s[0] < k[0] or s[1] < k[1]:
            tags.add("maxpool_overlap")
        if dil != (1, 1):
            tags.add("maxpool_dilation")
        if not self.last_kind.startswith("act:relu") and self.last_kind not in ("relu_block",):
            tags.add("maxpool_after_non_relu")
        self.add(PoolBlock(pool, self.tap()), "maxpool", f"maxpool k{k} s{s} p{p} d{dil} ceil={ceil} fn={functional}", tags)

    def b_avgpool(self) -> None:
        r = self.r
        k, s, p, ceil = self._pool_common("avg")
        include = r.coin()
        functional = r.coin()
        pool = MaxPoolF("avg", k, s, p, 1, ceil, include) if functional else \
            nn.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=include)
        tags = {"avgpool"}
        if functional:
            tags.add("avgpool_functional")
        if ceil:
            tags.add("avgpool_ceil")
            if self.hw[0] != self.hw[1] or k[0] != k[1]:
                tags.add("pool_ceil_nonsquare")
        if p != (0, 0):
            tags.add("avgpool_padding")
        if not include:
            tags.add("avgpool_exclude_pad")
        self.add(PoolBlock(pool, self.tap()), "avgpool",
                 f"avgpool k{k} s{s} p{p} ceil={ceil} include_pad={include} fn={functional}", tags)

    def b_bn(self) -> None:
        self.add(Wrap(None, self.tap(), self.bn(self.c)), "bn", "batchnorm", {"batchnorm"})

    def b_lrn(self) -> None:
        r = self.r
        size = r.randint((1, 5))
        alpha, beta, k = r.choice(([1e-4, 0.1])), r.choice(([0.75, 0.5])), r.choice(([1.0, 2.0]))
        if r.coin():
            self.add(Wrap(None, self.tap(), nn.LocalResponseNorm(size, alpha, beta, k)), "lrn",
                     f"lrn size={size}", {"lrn"})
        else:
            self.add(Wrap(lambda x, a=(size, alpha, beta, k): F.local_response_norm(x, *a), self.tap()), "lrn",
                     f"lrn (functional) size={size}", {"lrn", "lrn_functional"})

    def b_pad(self) -> None:
        r = self.r
        pads = tuple(r.randint((0, 2)) for _ in range(4))  # left, right, top, bottom
        if r.coin():
            self.add(Wrap(None, self.tap(), nn.ZeroPad2d(pads)), "pad", f"ZeroPad2d{pads}", {"pad_module"})
        else:
            self.add(Wrap(lambda x, p=pads: F.pad(x, p), self.tap()), "pad", f"F.pad{pads}", {"pad_functional"})

    def b_dropout(self) -> None:
        v = self.r.randint((0, 2))
        mod = (nn.Dropout(0.5), nn.Dropout2d(0.3), DropoutF(0.4))[v]
        tag = ("dropout", "dropout2d", "dropout_functional")[v]
        self.add(Wrap(None, self.tap(), mod), "dropout", tag, {tag})

    def b_se(self) -> None:
        r = self.r
        sq = r.randint((1, 4))
        if r.coin():
            silu = r.coin()
            self.add(TvSE(self.c, sq, silu, self.tap()), "se", f"torchvision SE sq={sq} silu={silu}",
                     {"se_torchvision"})
        else:
            v = r.randint((0, 3))
            self.add(HandSE(self.c, sq, v, self.tap()), "se", f"hand SE sq={sq} v{v}", {"se_hand"})
        self.after_se = True

    def b_residual(self) -> None:
        r = self.r
        c = self.c
        cout = r.choice(([c, 2, 4, 6]))
        stride = r.randint((1, 2)) if min(self.hw) >= 10 else 1
        k = r.choice(([1, 3]))
        dil = r.randint((1, 2)) if k == 3 else 1
        c1 = nn.Conv2d(c, cout, k, stride, dil * (k - 1) // 2, dil)
        tags = {"residual", "conv"}
        body: List[nn.Module] = [c1]
        desc = f"residual {c}->{cout} k{k} s{stride} d{dil}"
        if r.coin():
            body.append(self.bn(cout))
            tags.add("batchnorm")
        a1, at, ad = self.act(cout, fresh=True)
        body.append(a1)
        tags |= at
        desc += " " + ad
        if r.coin():
            sq = r.randint((1, 3))
            body.append(TvSE(cout, sq, r.coin(), False).se if r.coin() else HandSE(cout, sq, 0, False))
            tags |= {"se_in_residual", "se_torchvision" if isinstance(body[-1], torchvision.ops.SqueezeExcitation) else "se_hand"}
            desc += " +se"
            self.after_se = True
        body.append(nn.Conv2d(cout, cout, 3, 1, 1))
        shortcut = None
        if stride > 1 or cout != c or r.coin():
            shortcut = nn.Sequential(nn.Conv2d(c, cout, 1, stride, bias=False), self.bn(cout))
            tags |= {"residual_projection", "batchnorm"}
            desc += " proj"
            if stride > 1:
                tags |= {"strided_residual", "conv_stride"}
        act, at2, ad2 = activation(r, cout, self.gen, True, ("relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu"),
                                   inplace=r.coin())
        tags |= at2
        if "act_inplace" in at2:
            tags.add("inplace_after_add")
        desc += " out:" + ad2
        self.add(Residual(nn.ModuleList(body), shortcut, act, self.tap()), "residual", desc, tags)

    def b_concat(self) -> None:
        r = self.r
        n = r.randint((2, 3))
        branches, descs, tags = [], [], {"concat"}
        for _ in range(n):
            v = r.randint((0, 2))
            if v == 2:
                branches.append(nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(self.c, 2, 1)))
                descs.append("maxpool3/1/1+conv1x1")
                tags |= {"maxpool", "maxpool_padding", "maxpool_overlap", "conv"}
            else:
                conv, ct, cd = self.conv(self.c, same=True)
                tags |= ct
                if v == 1:
                    act, at, ad = self.act(conv.out_channels, fresh=True)
                    branches.append(nn.Sequential(conv, act))
                    tags |= at
                    cd += " " + ad
                else:
                    branches.append(conv)
                descs.append(cd)
        self.add(Concat(nn.ModuleList(branches), self.tap()), "concat", "concat[" + "; ".join(descs) + "]", tags)

    def b_shuffle(self) -> None:
        r = self.r
        if r.coin():  # ShuffleNet unit: split, one half through a branch, concat, shuffle
            half = self.c // 2
            conv, tags, cd = self.conv(half, half, same=True)
            act, at, ad = self.act(half, fresh=True)
            tags |= at | {"chunk", "concat", "shuffle", "concat_then_shuffle"}
            self.add(ShuffleUnit(nn.Sequential(conv, act), r.randint((0, 1)), self.tap()), "shuffle",
                     f"shuffle unit [{cd} {ad}]", tags)
            return
        g = r.choice(([gg for gg in (2, 3, 4) if self.c % gg == 0]))
        v = r.randint((0, 1))
        tags = {"shuffle"}
        if self.last_kind == "concat":
            tags.add("concat_then_shuffle")
        self.add(Shuffle(g, v, self.tap()), "shuffle", f"shuffle g{g} v{v}", tags)

    def b_mobile(self) -> None:
        """MobileNetV2 inverted residual: 1x1 expand, BN, act, depthwise 3x3, BN, act, 1x1
        project, BN; added to the input when the shapes allow."""
        r = self.r
        c = self.c
        e = r.choice(([1, 2]))
        stride = r.randint((1, 2)) if min(self.hw) >= 10 else 1
        a1, t1, d1 = self.act(c * e, fresh=True, kinds=("relu", "relu6", "hardswish", "silu"))
        a2, t2, d2 = self.act(c * e, fresh=True, kinds=("relu", "relu6", "hardswish", "silu"))
        body = nn.Sequential(nn.Conv2d(c, c * e, 1, bias=False), self.bn(c * e), a1,
                             nn.Conv2d(c * e, c * e, 3, stride, 1, groups=c * e, bias=False), self.bn(c * e), a2,
                             nn.Conv2d(c * e, c, 1, bias=False), self.bn(c))
        tags = t1 | t2 | {"conv", "conv_depthwise", "depthwise_pointwise", "batchnorm", "conv_bn_act", "conv_nobias"}
        res = stride == 1
        if res:
            tags.add("residual")
        else:
            tags.add("conv_stride")
        self.add(Mobile(body, res, self.tap()), "mobile", f"inverted residual e{e} s{stride} {d1} {d2}", tags)

    def b_channels_last(self) -> None:
        r = self.r
        hidden = r.randint((2, 8))
        res = r.randint((0, 2)) > 0
        fln = r.coin()
        tags = {"channels_last", "layernorm", "linear_per_position", "gelu", "act_module"}
        if res:
            tags.add("channels_last_residual")
        self.add(ChannelsLast(self.c, hidden, res, fln, self.tap()), "channels_last",
                 f"channels-last LN(functional={fln}) Linear {self.c}->{hidden}->{self.c} residual={res}", tags)


def _head(b: _Builder, classes: int) -> Tuple[Head, Set[str], str]:
    r = b.r
    h, w = b.hw
    pools = ["avg_module", "avg_functional", "mean", "max_module"]
    small = b.c * h * w <= 4000
    pool = "none" if small and r.randint((0, 2)) == 0 else r.choice(pools)
    flat = r.randint((0, 2))
    hidden = r.choice(([0, 5]))
    tags = {"flatten", "linear_head",
            {"avg_module": "global_avgpool", "avg_functional": "global_avgpool", "mean": "global_mean",
             "max_module": "global_maxpool", "none": "flatten_map"}[pool]}
    if hidden:
        tags |= {"fc_hidden", "relu", "act_module", "dropout"}
    head = Head(b.c, b.hw, pool, flat, hidden, classes)
    return head, tags, f"head pool={pool} flatten={flat} hidden={hidden} classes={classes}"


class Pick:
    """Uniform choices from a seeded stream (one stream per block: a block keeps its kind and
    parameters when a shrink drops another block)."""

    def __init__(self, key: str):
        self.rng = random.Random(key)

    def choice(self, options):
        return self.rng.choice(list(options))

    def randint(self, bounds: Tuple[int, int]) -> int:
        return self.rng.randint(*bounds)

    def coin(self) -> bool:
        return self.rng.random() < 0.5


def build(seed: int, keep: Sequence[bool], head: bool, in_ch: Optional[int] = None,
          kinds: Tuple[str, ...] = BLOCK_KINDS) -> GenNet:
    """The net of ``seed``: a conv stem, then block ``i`` (kind and parameters from its own
    stream) for every ``keep[i]`` that is true, then a classifier head when ``head``.
    Deterministic: ``repr`` of the result prints the call that rebuilds it."""
    top = Pick(f"{seed}:input")
    h = top.randint((16, 40))
    w = h if top.coin() else top.randint((16, 40))
    ch = in_ch if in_ch is not None else top.randint((1, 3))
    gen = torch.Generator()
    with _seeded(seed):
        b = _Builder(Pick(f"{seed}:stem"), gen.manual_seed(seed), ch, (h, w))
        b.b_conv()  # the stem: a conv first, so no in-place op touches the input
        for i, kept in enumerate(keep):
            r = Pick(f"{seed}:block{i}")
            kind = r.choice(kinds)
            if not kept:
                continue
            torch.manual_seed(seed + 7919 * (i + 1))  # its weights do not depend on the other blocks
            b.r, b.gen = r, gen.manual_seed(seed + 7919 * (i + 1))
            b.block(kind)
        head_mod, classes = None, 0
        if head:
            b.r = Pick(f"{seed}:head")
            classes = b.r.randint((2, 5))
            head_mod, ht, hd = _head(b, classes)
            b.tags |= ht
            b.spec.append(hd)
        model = Net(b.blocks, head_mod).to(DT).eval()
        with torch.no_grad():
            model(torch.zeros(1, ch, h, w, dtype=DT))  # a generator bug, not an engine's, if this fails
    tags = set(b.tags)
    if h != w:
        tags.add("input_nonsquare")
    # probes: every module the forward calls (in execution order), dropout aside
    gm = torch.fx.symbolic_trace(model)
    probes = [n.target for n in gm.graph.nodes if n.op == "call_module"
              and not isinstance(model.get_submodule(n.target), (nn.Dropout, nn.Dropout2d))]
    call = f"build({seed}, {[int(k) for k in keep]}, head={head}" + (f", in_ch={in_ch}" if in_ch else "") + \
        (f", kinds={kinds}" if kinds != BLOCK_KINDS else "") + ")"
    return GenNet(model, (h, w), ch, frozenset(tags), probes, classes, b.spec, seed, call)


@st.composite
def nets(draw, max_blocks: int = 9, head: Optional[bool] = None, in_ch: Optional[int] = None,
         kinds: Tuple[str, ...] = BLOCK_KINDS) -> GenNet:
    """A random float64 eval-mode CNN (:func:`build`): a conv stem, up to ``max_blocks`` blocks
    of ``kinds`` and a classifier head (always when ``head``, never when False, else drawn).

    The kinds and parameters come from uniform streams keyed by the drawn seed (so a few dozen
    draws cover every op; hypothesis' own choices cluster); hypothesis draws the seed, how many
    blocks there are and which are kept, so a failure shrinks by dropping blocks."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    # half the draws take the full length (richer nets, fewer draws to cover every op)
    n_blocks = draw(st.one_of(st.integers(0, max_blocks), st.just(max_blocks)))
    keep = [draw(st.booleans()) for _ in range(n_blocks)]  # shrinks towards dropping the block
    with_head = draw(st.booleans()) if head is None else head
    return build(seed, keep, with_head, in_ch, kinds)


@contextlib.contextmanager
def _seeded(seed: int):
    """Default weight init from ``seed`` in float64, without touching the global RNG state or
    leaving the default dtype changed."""
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(DT)
        try:
            yield
        finally:
            torch.set_default_dtype(old)


# -------------------------------------------------------------------------------- coverage
def covered(seen: Dict[str, int], want: Iterable[str] = OPS | COMBOS) -> List[str]:
    """The tags of ``want`` that ``seen`` (tag -> count) never saw."""
    return sorted(t for t in want if not seen.get(t))


def count(seen: Dict[str, int], net: GenNet) -> None:
    for t in net.tags:
        seen[t] = seen.get(t, 0) + 1


def gen_settings(n: int, **kw) -> settings:
    """Generated-net settings: no deadline, no example database; with :func:`check_nets`'s fixed
    seed a failure reproduces on every run and shrinks to a small net (printed)."""
    return settings(max_examples=n, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much], **kw)


@contextlib.contextmanager
def one_thread():
    """Tiny float64 convs run ~50x slower on 2 threads of a loaded machine than on one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def check_nets(name: str, check: Callable[[GenNet], None], n: int, strategy=None,
               want: Iterable[str] = OPS | COMBOS) -> Dict[str, int]:
    """Run ``check`` on ``n`` nets drawn from ``strategy`` (default :func:`nets`) with a fixed
    seed taken from ``name`` (printed on failure; every engine draws its own nets), then fail
    if some tag of ``want`` never appeared. Returns the tag counts."""
    seen: Dict[str, int] = {}
    fixed = zlib.crc32(name.encode())

    state: Dict[str, Any] = {"failed": False, "seeds": set()}

    @seed(fixed)
    @gen_settings(n)
    @given(net=strategy if strategy is not None else nets())
    def run(net: GenNet) -> None:
        if not state["failed"]:  # hypothesis re-draws seed 0 and its neighbours often: a new net each time
            assume(net.seed not in state["seeds"])
        try:
            check(net)
        except BaseException:
            state["failed"] = True  # from here on hypothesis shrinks: every candidate is fair
            raise
        state["seeds"].add(net.seed)
        count(seen, net)

    with one_thread():
        run()
    missing = covered(seen, want)
    assert not missing, f"{name}: {n} nets (seed {fixed}) never had {missing}; draw more nets"
    return seen
