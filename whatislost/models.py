"""Model stage: WideResNet-depth-k (Zagoruyko & Komodakis 2016) or ResNet-18 (He et al. 2016, CIFAR stem),
split into encoder / classifier / head.

`arch: wrn` (default): pre-activation basic blocks, widths 16, 16k, 32k, 64k, strides 1/2/2,
1x1 convolution shortcut where widths differ, no convolution bias.
`arch: resnet18`: the CIFAR ResNet-18 (3x3 stem convolution, no max-pool), post-activation
basic blocks [2, 2, 2, 2], widths 64/128/256/512, strides 1/2/2/2, 1x1 convolution + BN
shortcut where the shape changes; h (B, 512) is the global average of the last block.

Every convolution's name contains `conv`, so the recipes' regex
`^(encoder\\..*conv.*|classifier)\\.weight$` picks exactly the convolution and linear
weights of encoder and classifier, never the projection head, for either architecture.
Checkpoints store `model.arch` (a dict); `build_model(arch)` rebuilds either.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


PROBE_LAYOUTS = ("blocks", "authors")
ARCHS = ("wrn", "resnet18")


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


class EncoderHead(nn.Module):
    """Encoder + projection head as one module (SCL's contrastive stages): what SparseML's recipe sees, with
    the whole model's parameter names (encoder.*, head.*) and a forward (images -> z) for gradient samplers."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x))


class SplitNetwork(nn.Module):
    """encoder -> h (B, encoder.dim) -> classifier -> logits (B, num_classes); `head` (the SupCon projection
    MLP) exists only while SCL trains. Convolutions get Kaiming fan-out init, Linear biases zero."""

    def __init__(self, encoder: nn.Module, num_classes: int, projection_head: bool, arch: dict):
        super().__init__()
        self.arch = arch
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.dim, num_classes)
        self.head = ProjectionHead(encoder.dim) if projection_head else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.encoder(x))


class WideResNet(SplitNetwork):
    """WideResNet-depth-k: h is (B, 64k)."""

    def __init__(self, depth: int = 16, widen: int = 2, in_channels: int = 3, num_classes: int = 10,
                 projection_head: bool = False):
        super().__init__(Encoder(depth, widen, in_channels), num_classes, projection_head,
                         dict(depth=depth, widen=widen, in_channels=in_channels, num_classes=num_classes))


def build_model(arch: dict, projection_head: bool = False) -> nn.Module:
    """Rebuild a model from the `arch` dict stored in checkpoints: {'name': 'resnet18', in_channels, num_classes}
    or a WideResNet's {depth, widen, in_channels, num_classes} (no 'name': checkpoints of every version)."""
    arch = dict(arch)
    name = arch.pop("name", "wrn")
    if name == "resnet18":
        return ResNet18(**arch, projection_head=projection_head)
    if name != "wrn":
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHS)})")
    return WideResNet(**arch, projection_head=projection_head)


def model_for(cfg, in_channels: int, num_classes: int, projection_head: bool = False) -> nn.Module:
    """The model a TrainConfig (or its dict, as checkpoints hold it) asks for."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("arch", "wrn") == "resnet18":
        return ResNet18(in_channels, num_classes, projection_head=projection_head)
    return WideResNet(int(get("depth", 16)), int(get("widen", 2)), in_channels, num_classes, projection_head)


def arch_for(cfg, in_channels: int, num_classes: int) -> dict:
    """The `arch` dict a checkpoint of this TrainConfig (or its dict) records (built on the meta device: free)."""
    with torch.device("meta"):
        return dict(model_for(cfg, in_channels, num_classes).arch)


def model_label(cfg) -> str:
    """'wrn16-2' or 'resnet18': the model's name in run names, groups and tables, from a TrainConfig or its dict."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    if get("arch", "wrn") == "resnet18":
        return "resnet18"
    return f"wrn{get('depth', 16)}-{get('widen', 2)}"


def num_probes(cfg, layout: str = "blocks") -> int:
    """How many prediction-depth probes the encoder of a TrainConfig (or its dict) has in `layout` (the model is
    built on the meta device: no memory, no draw from the random generator)."""
    with torch.device("meta"):
        return model_for(cfg, 3, 10).encoder.num_probes(layout)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- ResNet-18 (CIFAR stem)
class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the input (or a 1x1 conv + BN shortcut where
    the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv_shortcut = self.bn_shortcut = None
        if c_in != c_out or stride != 1:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
            self.bn_shortcut = nn.BatchNorm2d(c_out)

    def forward(self, x, taps: list | None = None):
        """x (B, C_in, H, W) -> (B, C_out, H', W'). With `taps`, appends the probes of this block in the authors'
        convention (as for WideResNet's Block), each globally average-pooled to (B, C_out): the inner activation
        relu(bn1(conv1)), the residual branch bn2(conv2) before the sum, and, where there is no shortcut
        convolution, the block's output."""
        inner = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(inner))
        shortcut = x if self.conv_shortcut is None else self.bn_shortcut(self.conv_shortcut(x))
        out = F.relu(y + shortcut)
        if taps is not None:
            taps += [inner.mean((2, 3)), y.mean((2, 3))]
            if self.conv_shortcut is None:
                taps.append(out.mean((2, 3)))
        return out


class ResNetEncoder(nn.Module):
    """Images (B, C, H, W) -> h (B, 512): CIFAR stem (conv3x3-BN-ReLU, no max-pool), 4 stages of 2 basic blocks,
    global average pool."""

    def __init__(self, in_channels: int = 3, widths=(64, 128, 256, 512), blocks_per_stage=(2, 2, 2, 2)):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, c_in = [], widths[0]
        for stage, (c_out, n) in enumerate(zip(widths, blocks_per_stage)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.dim = c_in

    def num_probes(self, layout: str = "blocks") -> int:
        """How many hidden representations forward(return_hidden=True, probes=layout) returns."""
        if layout == "blocks":
            return len(self.blocks) + 1
        return 1 + sum(3 if b.conv_shortcut is None else 2 for b in self.blocks)

    def forward(self, x, return_hidden: bool = False, probes: str = "blocks"):
        """h (B, 512); with return_hidden also a list of pooled (B, C_p) tensors for prediction depth.

        probes="blocks": the stem output (after its BN-ReLU) and every block's output: 9 probes. The last
            block's pooled output IS h (no final BN-ReLU as in WideResNet), so h is the last probe and is not
            repeated.
        probes="authors": the convention of Corti et al.'s WideResNet probes carried over: the stem output,
            then in every block relu(bn1(conv1)), the residual branch bn2(conv2) before the sum, and the block
            output where the block has no shortcut convolution: 1 + 3 + 3 + 3 x (2 + 3) = 22 probes; the last is
            the last block's output, i.e. h.
        """
        if probes not in PROBE_LAYOUTS:
            raise ValueError(f"probes must be one of {PROBE_LAYOUTS}, got {probes!r}")
        x = F.relu(self.bn(self.conv(x)))
        hidden = [x.mean((2, 3))] if return_hidden else None
        for block in self.blocks:
            x = block(x, taps=hidden if return_hidden and probes == "authors" else None)
            if return_hidden and probes == "blocks":
                hidden.append(x.mean((2, 3)))
        h = x.mean((2, 3))  # in "blocks", the last probe already is h
        return (h, hidden) if return_hidden else h


class ResNet18(SplitNetwork):
    """The CIFAR ResNet-18: h is (B, 512); 11,173,962 parameters with 3 input channels and 10 classes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, projection_head: bool = False):
        super().__init__(ResNetEncoder(in_channels), num_classes, projection_head,
                         dict(name="resnet18", in_channels=in_channels, num_classes=num_classes))
