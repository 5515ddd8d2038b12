"""The image classifier networks, in plain ``torch.nn`` (no torchvision, no weight download).

Copied into every image bento beside ``service.py`` and logged with every image model in MLflow
(the pyfunc loads it from the model's artifacts); the pipeline imports it as
``bentos.image_classifier.maas_nets``. torch only.

A network is described by a JSON-safe *spec* (``arch`` plus its sizes), stored beside the
safetensors weights, so that :func:`build_net` can rebuild it anywhere:

- ``cnn`` (default): conv ``conv1`` 3x3 -> ReLU -> max-pool 2 -> conv ``conv2`` 3x3 -> ReLU ->
  max-pool 2 -> flatten -> dense ``dense`` -> ReLU -> dropout -> linear to the classes (the
  softmax is applied to the logits by the caller). Convolutions pad by 1, so the spatial size is
  only divided by the two pools (28 -> 7, 16 -> 4, 8 -> 2).
- ``resnet18``: torchvision's resnet18 layout (four stages of two basic blocks, widths
  ``width`` x 1/2/4/8, batch norm, global average pool) adapted to small inputs: a 3x3 stride-1
  stem and no stem max-pool, so an 8x8 or 28x28 image keeps enough resolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("cnn", "resnet18")
#: spec defaults per architecture (besides in_channels, num_classes, image_size)
DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn": {"conv1": 32, "conv2": 64, "dense": 64, "dropout": 0.0},
    "resnet18": {"width": 64, "dropout": 0.0},
}


def build_net(spec: dict[str, Any]) -> nn.Module:
    """The untrained ``torch.nn.Module`` of ``spec`` (``arch``, ``in_channels``,
    ``num_classes``, ``image_size`` and the architecture's sizes, see :data:`DEFAULTS`)."""
    arch = spec.get("arch", "cnn")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown image architecture {arch!r}; known: {list(ARCHITECTURES)}")
    s = {**DEFAULTS[arch], **spec}
    if arch == "cnn":
        return SmallCNN(s)
    return ResNet18Small(s)


class SmallCNN(nn.Module):
    """conv -> pool -> conv -> pool -> dense -> classes (see the module docstring)."""

    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        size = int(s["image_size"])
        if size < 4:
            raise ValueError(f"image_size={size}: the cnn needs at least 4x4 pixels")
        c1, c2, dense = int(s["conv1"]), int(s["conv2"]), int(s["dense"])
        self.features = nn.Sequential(
            nn.Conv2d(int(s["in_channels"]), c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, dense), nn.ReLU(),
            nn.Dropout(float(s["dropout"])), nn.Linear(dense, int(s["num_classes"])),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (torchvision's)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18Small(nn.Module):
    """resnet18 (2-2-2-2 basic blocks) with a small-input stem (see the module docstring)."""

    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        w = int(s["width"])
        self.stem = nn.Sequential(nn.Conv2d(int(s["in_channels"]), w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU())
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Dropout(float(s["dropout"])),
                                  nn.Linear(cin, int(s["num_classes"])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def load_net(spec: dict[str, Any], weights_file: str) -> nn.Module:
    """The network of ``spec`` with its weights from a safetensors file, in eval mode."""
    from safetensors.torch import load_file

    net = build_net(spec)
    net.load_state_dict(load_file(weights_file))
    return net.eval()
