"""Model stage: WideResNet-depth-k (Zagoruyko & Komodakis 2016) split into encoder / classifier / head.

Pre-activation basic blocks, widths 16, 16k, 32k, 64k, strides 1/2/2, 1x1 convolution
shortcut where widths differ, no convolution bias. Every convolution's name contains
`conv`, so the recipes' regex `^(encoder\\..*conv.*|classifier)\\.weight$` picks exactly
the convolution and linear weights of encoder and classifier, never the projection head.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


PROBE_LAYOUTS = ("blocks", "authors")


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

    def forward(self, x, taps: list | None = None):
        """x (B, C_in, H, W) -> (B, C_out, H', W'). With `taps`, appends the authors' probes of this block,
        each globally average-pooled to (B, C_out): the inner activation relu(bn2(conv1)), the second
        convolution's output before the residual sum, and, where there is no shortcut convolution, the
        block's output (FraCorti/...: utils/models.py, BasicBlock.forward)."""
        o = F.relu(self.bn1(x))
        # where the shape changes the shortcut sees the pre-activated input, as in the WRN reference code
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(o)
        inner = F.relu(self.bn2(self.conv1(o)))
        y = self.conv2(inner)
        out = y + shortcut
        if taps is not None:
            taps += [inner.mean((2, 3)), y.mean((2, 3))]
            if self.conv_shortcut is None:
                taps.append(out.mean((2, 3)))
        return out


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

    def num_probes(self, layout: str = "blocks") -> int:
        """How many hidden representations forward(return_hidden=True, probes=layout) returns."""
        if layout == "blocks":
            return len(self.blocks) + 2
        return 1 + sum(3 if b.conv_shortcut is None else 2 for b in self.blocks)

    def forward(self, x, return_hidden: bool = False, probes: str = "blocks"):
        """h (B, dim); with return_hidden also a list of pooled (B, C_p) tensors for prediction depth.

        probes="blocks": the stem output, every block's output, and h itself (after the final
            BN-ReLU): 8 probes for WRN-16-2.
        probes="authors": the probes of Corti et al.'s code (utils/models.py): the stem output,
            then in every block relu(bn2(conv1)), conv2's output before the residual sum, and the
            block output where the block has no shortcut convolution: 16 probes for WRN-16-2
            (their PD values run 1-16); h itself is not probed.
        """
        if probes not in PROBE_LAYOUTS:
            raise ValueError(f"probes must be one of {PROBE_LAYOUTS}, got {probes!r}")
        x = self.conv(x)
        hidden = [x.mean((2, 3))] if return_hidden else None
        for block in self.blocks:
            x = block(x, taps=hidden if return_hidden and probes == "authors" else None)
            if return_hidden and probes == "blocks":
                hidden.append(x.mean((2, 3)))
        h = F.relu(self.bn(x)).mean((2, 3))
        if return_hidden:
            if probes == "blocks":
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
