"""``zfnet_demo``: a small ZF-style chain CNN that deconvis trains itself (CPU, minutes).

Layout follows Zeiler & Fergus's revised architecture (ECCV 2014, Fig. 3: first layer 7x7
stride 2, second 5x5 stride 2), scaled down for 128x128 input and a few CPU minutes of
training. Shapes for a [N, 3, 128, 128] input:

=========  ===========================  ================
layer      module                       output [C, H, W]
=========  ===========================  ================
conv1      Conv2d 3->32, 7x7 /2 pad 3   32 x 64 x 64
pool1      MaxPool 3x3 /2               32 x 31 x 31
conv2      Conv2d 32->64, 5x5 /2 pad 2  64 x 16 x 16
pool2      MaxPool 3x3 /2               64 x 7 x 7
conv3      Conv2d 64->96, 3x3 pad 1     96 x 7 x 7
conv4      Conv2d 96->96, 3x3 pad 1     96 x 7 x 7
conv5      Conv2d 96->64, 3x3 pad 1     64 x 7 x 7
pool5      MaxPool 3x3 /2               64 x 3 x 3
avgpool    AdaptiveAvgPool (3, 3)       64 x 3 x 3
fc6, fc7   Dropout/Linear/ReLU x2       256, ``num_classes``
=========  ===========================  ================

Each conv is followed by a ReLU, so ``features`` is a plain chain like torchvision's AlexNet
(the same alias scheme conv1..conv5 applies). No contrast normalisation (ZF's is optional).
Initialisation is deterministic (``seed``) and leaves the global RNG untouched.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

#: classes of the shipped checkpoint (exemplar classes of deconvis.training.surrogate); the default of
#: :func:`zfnet_demo` so that ``load_model('zfnet_demo', 'deconvis/assets/zfnet_demo.pt')`` fits.
DEMO_NUM_CLASSES = 128
#: network input size (h, w) in pixels the demo is trained at
DEMO_INPUT_SIZE: Tuple[int, int] = (128, 128)
#: short-side resize before the centre crop (128 / 0.875, the usual ImageNet ratio)
DEMO_RESIZE = 146


class ZFNetDemo(nn.Module):
    """Small ZF-style chain network: ``features`` -> ``avgpool`` -> flatten -> ``classifier``."""

    def __init__(self, num_classes: int = DEMO_NUM_CLASSES, dropout: float = 0.5,
                 widths: Tuple[int, int, int, int, int] = (32, 64, 96, 96, 64)) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=7, stride=2, padding=3),   # conv1
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),                  # pool1
            nn.Conv2d(c1, c2, kernel_size=5, stride=2, padding=2),  # conv2
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),                  # pool2
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),            # conv3
            nn.ReLU(),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),            # conv4
            nn.ReLU(),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),            # conv5
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),                  # pool5
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(c5 * 3 * 3, 256),                             # fc6
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(256, num_classes),                            # fc7 (logits)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, 3, H, W] normalised images -> logits [N, num_classes]."""
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


#: initial bias of conv2..conv5 (small positive, as AlexNet's 1 / ZF's for some layers): their
#: inputs are rectified (>= 0), so a channel whose pre-activation an early AdamW step drives
#: below 0 everywhere gets no gradient again -- with zero biases ~30% of conv2 died this way
DEMO_CONV_BIAS = 0.1


def _init_weights(model: ZFNetDemo, conv_bias: float = DEMO_CONV_BIAS) -> None:
    """conv1 N(0, 0.01) as ZF (small: what training writes into the first-layer filters soon
    outweighs the init noise), the other convs He-normal (fan_out, as torchvision AlexNet/VGG:
    without normalisation layers a deep ReLU stack needs it), linears N(0, 0.01); conv1 and
    linear biases zero, conv2..conv5 biases ``conv_bias`` (keeps their ReLUs alive early on)."""
    first = model.features[0]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m is first:
                nn.init.normal_(m.weight, 0.0, 0.01)
            else:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0.0 if m is first else conv_bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def zfnet_demo(num_classes: int = DEMO_NUM_CLASSES, seed: int = 0, dropout: float = 0.5,
               conv_bias: float = DEMO_CONV_BIAS) -> ZFNetDemo:
    """Build the demo net with a deterministic random init (``seed``); global RNG unchanged.
    ``conv_bias``: initial bias of conv2..conv5 (see :data:`DEMO_CONV_BIAS`).

    Input [N, 3, 128, 128] (any size >= 63 px works: the adaptive pool fixes the classifier
    input), output logits [N, ``num_classes``].
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ZFNetDemo(num_classes=num_classes, dropout=dropout)
        _init_weights(model, conv_bias=conv_bias)
    return model
