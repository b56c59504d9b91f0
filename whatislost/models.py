"""Model stage: WideResNet-depth-k (Zagoruyko & Komodakis 2016) split into encoder / classifier / head.

Pre-activation basic blocks, widths 16, 16k, 32k, 64k, strides 1/2/2, 1x1 convolution
shortcut where widths differ, no convolution bias. Every convolution's name contains
`conv`, so the recipes' regex `^(encoder\\..*conv.*|classifier)\\.weight$` picks exactly
the convolution and linear weights of encoder and classifier, never the projection head.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus (1x1 conv) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.conv_shortcut = None
        if c_in != c_out or stride != 1:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # where the shape changes the shortcut sees the pre-activated input, as in the WRN reference code
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(o)
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + shortcut


class Encoder(nn.Module):
    """Images (B, C, H, W) -> representation h (B, 64k): global average pool after the final BN-ReLU."""

    def __init__(self, depth: int = 16, widen: int = 2, in_channels: int = 3):
        super().__init__()
        assert (depth - 4) % 6 == 0, "WideResNet depth must be 6n+4"
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c_in = [], widths[0]
        for c_out, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(Block(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.dim = c_in

    @property
    def num_probes(self) -> int:
        """Hidden representations returned by forward(return_hidden=True): stem, each block, final h."""
        return len(self.blocks) + 2

    def forward(self, x, return_hidden: bool = False):
        """h (B, dim); with return_hidden also a list of pooled (B, C_p) tensors for prediction depth:
        the stem output, every block's output, and h itself (after the final BN-ReLU)."""
        x = self.conv(x)
        hidden = [x.mean((2, 3))] if return_hidden else None
        for block in self.blocks:
            x = block(x)
            if return_hidden:
                hidden.append(x.mean((2, 3)))
        h = F.relu(self.bn(x)).mean((2, 3))
        if return_hidden:
            hidden.append(h)
            return h, hidden
        return h


class ProjectionHead(nn.Module):
    """SupCon projection MLP (dim -> dim -> dim), discarded after contrastive training."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, out_dim)

    def forward(self, h):
        return self.fc2(F.relu(self.fc1(h)))


class WideResNet(nn.Module):
    """encoder -> h (B, 64k) -> classifier -> logits (B, num_classes). `head` exists only while SCL trains."""

    def __init__(self, depth: int = 16, widen: int = 2, in_channels: int = 3, num_classes: int = 10,
                 projection_head: bool = False):
        super().__init__()
        self.arch = dict(depth=depth, widen=widen, in_channels=in_channels, num_classes=num_classes)
        self.encoder = Encoder(depth, widen, in_channels)
        self.classifier = nn.Linear(self.encoder.dim, num_classes)
        self.head = ProjectionHead(self.encoder.dim) if projection_head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.encoder(x))


def build_model(arch: dict, projection_head: bool = False) -> WideResNet:
    """Rebuild a model from the `arch` dict stored in checkpoints."""
    return WideResNet(**arch, projection_head=projection_head)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
