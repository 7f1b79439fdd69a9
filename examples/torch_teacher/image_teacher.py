"""An image teacher: ResNet-50 on uint8 3x224x224 images -> 1000 logits (random weights).

Serve it with ``zdistill-teacher --model examples/torch_teacher/image_teacher.py:classify
--port 9292``.  Images travel as **uint8** (150 KB each) and become float on the GPU,
normalised there: float32 on the wire would be 4x the bytes for the same picture.
The GPU then reads them in **channels-last** order, the layout its bf16 convolutions
run fastest in.  torchvision's ``resnet50`` is used when it imports; otherwise the
same network defined below.  ``ZDISTILL_TORCH_TEACHER_SIZE=tiny`` serves a narrow,
shallow version on 3x32x32 images, for tests on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # served as a file: its sibling modules

from torch_serving import TorchTeacher, model_size  # noqa: E402

import zdistill  # noqa: E402

TINY = model_size() == "tiny"
IMAGE = 32 if TINY else 224
CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as every torchvision classifier expects
STD = (0.229, 0.224, 0.225)


class Bottleneck(nn.Module):
    """ResNet's 1x1 -> 3x3 -> 1x1 block (stride on the 3x3, as torchvision's v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out),
        )
        self.shortcut = (nn.Identity() if stride == 1 and inplanes == out else
                         nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(blocks: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, classes: int = CLASSES) -> nn.Module:
    """ResNet-50 with the defaults (25.6M parameters, as torchvision's); narrower and shallower when asked."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    inplanes = width
    for stage, count in enumerate(blocks):
        planes = width * 2**stage
        for i in range(count):
            layers.append(Bottleneck(inplanes, planes, 2 if i == 0 and stage > 0 else 1))
            inplanes = planes * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, classes)]
    return nn.Sequential(*layers)


class Normalise(nn.Module):
    """uint8 NCHW -> float, ImageNet-normalised, channels-last: all on the device, after the copy."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", 1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean) * self.scale).contiguous(memory_format=torch.channels_last)


def build() -> nn.Module:
    if TINY:
        net = resnet(blocks=(1, 1, 1, 1), width=8)
    else:
        try:
            from torchvision.models import resnet50
        except ImportError:  # the same network, defined above
            net = resnet()
        else:
            net = resnet50(weights=None)  # random weights: nothing is downloaded
    return nn.Sequential(Normalise(), net.to(memory_format=torch.channels_last))


def forward(module: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"logits": module(inputs["img"]).float()}


TEACHER = TorchTeacher(build, forward)


@zdistill.teacher_function(feeds={"img": ("uint8", [3, IMAGE, IMAGE])}, fetches={"logits": ("float32", [CLASSES])})
def classify(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ResNet-50 logits of uint8 images (bf16 on a GPU)."""
    return TEACHER(batch)
