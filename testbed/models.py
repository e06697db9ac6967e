"""Models the benchmarks, examples and tests share (outside the mmfast package): a
ResNet-18 trunk and the seed-like audio-visual classifier of the MMPareto and DGL papers.

Written here (not imported from torchvision) so the shapes are the project's own
and nothing is downloaded.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18Trunk(nn.Module):
    """ResNet-18 without its classifier: ``[B, C, H, W] -> [B, 512]``."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        self.layers = nn.Sequential(
            *[nn.Sequential(BasicBlock(cin, cout, s), BasicBlock(cout, cout)) for cin, cout, s in widths]
        )

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        # global average pool as a mean: a new tensor, not a view (FSDP2 warns on a view output)
        return self.layers(x).mean(dim=(2, 3))


class AVClassifier(nn.Module):
    """Two encoders, a concat head and one unimodal head per modality.

    ``forward(x_a, x_v) -> (out, out_a, out_v)``; the unimodal heads see only their
    own encoder's features, as in the MMPareto paper.
    """

    def __init__(self, audio_net: nn.Module, visual_net: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.audio_net = audio_net
        self.visual_net = visual_net
        self.fusion_module = nn.Linear(2 * dim, n_classes)
        self.head_audio = nn.Linear(dim, n_classes)
        self.head_visual = nn.Linear(dim, n_classes)

    def forward(self, x_a, x_v):
        f_a, f_v = self.audio_net(x_a), self.visual_net(x_v)
        return self.fusion_module(torch.cat([f_a, f_v], 1)), self.head_audio(f_a), self.head_visual(f_v)


def resnet18_av(n_classes: int = 6) -> AVClassifier:
    """The seed-like model of BENCHMARKS.md: 1-channel audio and 3-channel visual ResNet-18s."""
    return AVClassifier(ResNet18Trunk(1), ResNet18Trunk(3), 512, n_classes)


class ConcatFusionDGL(nn.Module):
    """DGL's fusion: one linear classifier shared by the multimodal and unimodal logits.

    The multimodal logits see the *detached* concatenation; the unimodal logits of a
    modality are the same classifier applied to its features with zeros elsewhere.
    Returns ``(out, out_a, out_v)``.
    """

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.fc_out = nn.Linear(2 * dim, n_classes)

    def forward(self, f_a, f_v):
        out = self.fc_out(torch.cat([f_a, f_v], 1).detach())
        out_a = self.fc_out(torch.cat([f_a, torch.zeros_like(f_v)], 1))
        out_v = self.fc_out(torch.cat([torch.zeros_like(f_a), f_v], 1))
        return out, out_a, out_v


class DGLClassifier(nn.Module):
    """Two encoders and a ``ConcatFusionDGL``: ``forward(x_a, x_v) -> (out, out_a, out_v)``."""

    def __init__(self, audio_net: nn.Module, visual_net: nn.Module, dim: int, n_classes: int):
        super().__init__()
        self.audio_net = audio_net
        self.visual_net = visual_net
        self.fusion_module = ConcatFusionDGL(dim, n_classes)

    def forward(self, x_a, x_v):
        return self.fusion_module(self.audio_net(x_a), self.visual_net(x_v))


def resnet18_av_dgl(n_classes: int = 6) -> DGLClassifier:
    """The DGL counterpart of ``resnet18_av``."""
    return DGLClassifier(ResNet18Trunk(1), ResNet18Trunk(3), 512, n_classes)
