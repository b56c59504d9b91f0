"""Batched image augmentation on the training device, at memory speed.

Every op works on a whole batch of float images ``x`` of shape (B, C, H, W) with values in [0, 1], on any
device, with per-sample random parameters, and without per-sample Python loops or host synchronisation
(no ``.item()``, no data-dependent shapes, no host-to-device copies of Python lists).

Each op is split into
  (a) a sampler ``sample_*(batch, ..., device=, generator=)`` that draws per-sample parameter tensors with the
      distribution of the torchvision transform it reproduces (uniform draws from ``torch.rand`` on ``device``,
      i.e. the global RNG of that device unless a ``generator`` is given), and
  (b) an apply function taking those parameters explicitly, so that the same parameters can be fed to
      torchvision's functional ops image by image (see tests/test_augment.py).

Ops and the transforms they reproduce (torchvision semantics on float tensors):
  * ``crop_flip``: ``RandomCrop(size, padding=p)`` (zero padding) followed by ``RandomHorizontalFlip(0.5)`` and
    optionally ``RandomVerticalFlip(0.5)``, as one gather. This is the Sup augmentation of the paper (random crop
    with 4-pixel zero padding + horizontal flip, the standard CIFAR-10 recipe).
  * ``resized_crop``: ``RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3))`` with bilinear
    interpolation, fused with the flips, as one batched ``grid_sample``.
  * ``color_jitter``: ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, including torchvision's random
    order of the four ops per image.
  * ``random_grayscale``: ``RandomGrayscale(p=0.2)`` (ITU-R 601-2 luma, replicated to 3 channels).
The SCL views are those of SimCLR (Chen et al. 2020) as used by SupCon (Khosla et al. 2020):
RandomResizedCrop(scale 0.2..1) + horizontal flip + colour jitter (p=0.8) + grayscale (p=0.2).
SupCon's reference code applies them to PIL uint8 images; here they act on float images (no 8-bit
quantisation between the ops), i.e. they match torchvision's tensor kernels.

``make_augment(kind, image_size, ...)`` builds the callable used by the trainer (kinds "sup", "scl", "none").
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale
LUMA = (0.2989, 0.587, 0.114)


def _rand(shape, device, generator) -> Tensor:
    return torch.rand(shape, device=device, generator=generator)


def _below(u: Tensor, n) -> Tensor:
    """int64 integers uniform in [0, n) from uniforms u in [0, 1); n an int or an integer-valued float tensor.
    (The clamp only guards against u * n rounding up to n in float32.)"""
    k = torch.floor(u * n)
    k = torch.minimum(k, n - 1) if isinstance(n, Tensor) else k.clamp_max_(n - 1)
    return k.long()


def _size2(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


# --------------------------------------------------------------------------------------------------------------
# flips

def sample_flip(batch: int, p: float = 0.5, *, device=None, generator=None) -> Tensor:
    """(B,) bool, True with probability p, like ``RandomHorizontalFlip(p)`` / ``RandomVerticalFlip(p)``."""
    return _rand(batch, device, generator) < p


# --------------------------------------------------------------------------------------------------------------
# random crop with zero padding + flips (Sup)

class CropFlipParams(NamedTuple):
    """Per-sample parameters of ``crop_flip``; all (B,).

    top, left: int64 offsets of the crop in the zero-padded image (torchvision's RandomCrop.get_params on the
    padded image: uniform integers in [0, H + 2p - size] and [0, W + 2p - size]).
    hflip, vflip: bool, applied after the crop.
    """

    top: Tensor
    left: Tensor
    hflip: Tensor
    vflip: Tensor


def sample_crop_flip(batch: int, in_size, size, padding: int, hflip: bool = True, vflip: bool = False, *,
                     device=None, generator=None) -> CropFlipParams:
    """Parameters of RandomCrop(size, padding) + RandomHorizontalFlip(0.5) [+ RandomVerticalFlip(0.5)].

    in_size: (H, W) of the unpadded input (or an int); size: output (h, w) (or an int).
    Flips that are switched off come out all False (the draws are made anyway, so the RNG stream does not
    depend on the switches).
    """
    (H, W), (h, w) = _size2(in_size), _size2(size)
    n_top, n_left = H + 2 * padding - h + 1, W + 2 * padding - w + 1
    if n_top < 1 or n_left < 1:
        raise ValueError(f"crop {h}x{w} does not fit in {H}x{W} padded by {padding}")
    u = _rand((batch, 4), device, generator)
    off = torch.zeros_like(u[:, 2], dtype=torch.bool)
    return CropFlipParams(_below(u[:, 0], n_top), _below(u[:, 1], n_left),
                          u[:, 2] < 0.5 if hflip else off, u[:, 3] < 0.5 if vflip else off)


def _flip_index(n: int, flip: Tensor) -> Tensor:
    """(B, n) int64: 0..n-1, reversed where flip (B,) is True."""
    ar = torch.arange(n, device=flip.device)
    return torch.where(flip[:, None], n - 1 - ar, ar)


def _pixel_grid(rows: Tensor, cols: Tensor, H: int, W: int) -> Tensor:
    """(B, h, w, 2) grid_sample grid (align_corners=False) of separable pixel coordinates rows (B, h), cols (B, w)."""
    gy = rows.to(torch.float32).mul(2 / H).add_(1 / H - 1)  # (2 r + 1) / H - 1
    gx = cols.to(torch.float32).mul(2 / W).add_(1 / W - 1)
    B, h, w = rows.shape[0], rows.shape[1], cols.shape[1]
    return torch.stack((gx[:, None, :].expand(B, h, w), gy[:, :, None].expand(B, h, w)), dim=-1)


def _grid_sample(x: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """F.grid_sample in float32 (or float64): half/bfloat16 grids could not address pixels exactly."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    out = F.grid_sample(x.to(dtype), grid.to(dtype), mode=mode, padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype)


def crop_flip(x: Tensor, params: CropFlipParams, size, padding: int) -> Tensor:
    """Crop (B, C, H, W) -> (B, C, h, w) out of x zero-padded by `padding`, then flip: one gather.

    Output pixel (r, c) of sample b is x[b, :, top - p + r', left - p + c'] (0 outside x), with r' = h-1-r where
    vflip and c' = w-1-c where hflip: torchvision's F.pad + F.crop + F.hflip / F.vflip, exactly. The gather is a
    nearest-neighbour F.grid_sample at pixel centres with zero padding (one kernel, no padded copy; faster on
    CPU than torch.gather with an expanded index).
    """
    B, C, H, W = x.shape
    h, w = _size2(size)
    p = int(padding)
    rows = _flip_index(h, params.vflip) + (params.top - p)[:, None]  # (B, h) in x's coordinates
    cols = _flip_index(w, params.hflip) + (params.left - p)[:, None]  # (B, w)
    return _grid_sample(x, _pixel_grid(rows, cols, H, W), "nearest", "zeros")


# --------------------------------------------------------------------------------------------------------------
# RandomResizedCrop

class Boxes(NamedTuple):
    """Per-sample crop boxes, int64 (B,) each: top row, left column, height, width (torchvision's i, j, h, w)."""

    top: Tensor
    left: Tensor
    height: Tensor
    width: Tensor


def sample_resized_crop(batch: int, in_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), attempts: int = 10, *,
                        device=None, generator=None) -> Boxes:
    """Boxes with the distribution of torchvision's ``RandomResizedCrop.get_params``, vectorised.

    For each sample, `attempts` (10) candidates are drawn at once: area fraction uniform in `scale`, log aspect
    ratio uniform in log(`ratio`), w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first
    candidate with 0 < w <= W and 0 < h <= H wins and its offsets are uniform integers in [0, H - h] x [0, W - w].
    When no candidate fits, the central crop of the whole image with its aspect ratio clamped to `ratio`.
    Rounding is half-to-even like Python's round.
    """
    H, W = _size2(in_size)
    u = _rand((batch, attempts + 1, 2), device, generator)
    ua, ij = u[:, :attempts], u[:, attempts]
    area = (H * W) * (scale[0] + (scale[1] - scale[0]) * ua[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * ua[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting attempt (0 if none)
    found = ok.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: central crop, aspect ratio clamped to the range
    in_ratio = W / H
    if in_ratio < min(ratio):
        fw, fh = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(H * max(ratio))), H
    else:
        fw, fh = W, H
    w = torch.where(found, w, float(fw))
    h = torch.where(found, h, float(fh))
    top = torch.where(found, _below(ij[:, 0], H - h + 1), (H - fh) // 2)
    left = torch.where(found, _below(ij[:, 1], W - w + 1), (W - fw) // 2)
    return Boxes(top, left, h.long(), w.long())


def _resample_coords(start: Tensor, length: Tensor, out: int, flip: Optional[Tensor]) -> Tensor:
    """(B, out) float source pixel coordinates of bilinear resizing of pixels [start, start + length) to `out`.

    Source pixel coordinate of output pixel k: start + clamp((k + 0.5) * length / out - 0.5, 0, length - 1),
    the half-pixel rule of F.interpolate(mode="bilinear", align_corners=False) on the crop, with its clamping
    at the crop's borders (so pixels outside the crop never leak in).
    """
    k = torch.arange(out, device=start.device, dtype=torch.float32)
    if flip is not None:
        k = torch.where(flip[:, None], out - 1 - k, k)
    length = length.to(torch.float32)[:, None]
    src = ((k + 0.5) * (length / out) - 0.5).clamp_min_(0)
    return torch.minimum(src, length - 1) + start.to(torch.float32)[:, None]


def resized_crop(x: Tensor, boxes: Boxes, size, hflip: Optional[Tensor] = None,
                 vflip: Optional[Tensor] = None) -> Tensor:
    """Crop each sample's box and resize it to `size` with bilinear interpolation, then flip: (B, C, h, w).

    One batched ``F.grid_sample`` over a per-sample separable grid. Equals torchvision's
    ``resized_crop(img, top, left, height, width, size, BILINEAR, antialias=False)`` (up to float rounding,
    ~1e-6), and also ``antialias=True`` whenever the box is not larger than `size` (upscaling; always the case
    when `size` is the input size, as in the trainer), since the antialiasing filter only differs when
    downscaling. hflip/vflip: optional (B,) bool, applied after the resize (fused into the grid).
    """
    B, C, H, W = x.shape
    h, w = _size2(size)
    rows = _resample_coords(boxes.top, boxes.height, h, vflip)  # (B, h) source pixel coordinates
    cols = _resample_coords(boxes.left, boxes.width, w, hflip)  # (B, w)
    return _grid_sample(x, _pixel_grid(rows, cols, H, W), "bilinear", "border")


# --------------------------------------------------------------------------------------------------------------
# colour

def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma 0.2989 R + 0.587 G + 0.114 B (same float operations as torchvision)."""
    r, g, b = x.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _gray(x: Tensor) -> Tensor:
    return rgb_to_grayscale(x) if x.shape[1] == 3 else x


def _col(v: Tensor, x: Tensor) -> Tensor:
    """(B,) per-sample values -> (B, 1, 1, 1) in x's dtype."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_brightness with per-sample factors (B,): clamp(x * f, 0, 1)."""
    return (x * _col(factor, x)).clamp_(0, 1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    return torch.addcmul(other * (1 - f), x, f).clamp_(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_contrast, per-sample factors (B,): blend with the mean of the grayscale image, clamp."""
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, _col(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_saturation, per-sample factors (B,): blend with the grayscale image, clamp.
    Identity on 1-channel images (as torchvision)."""
    if x.shape[1] == 1:
        return x.clone()
    return _blend(x, rgb_to_grayscale(x), _col(factor, x))


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_hue, per-sample factors (B,) in [-0.5, 0.5]: HSV hue shifted by `factor` turns.

    Computed without materialising HSV: the hue sector h6 in [0, 6) comes from the max channel (R, then G, then B
    on ties, like torchvision), and each output channel is max - (max - min) * clamp(min(k, 4 - k), 0, 1) with
    k = (n + h6') mod 6, n = 5, 3, 1 for R, G, B (the closed form of HSV -> RGB with V = max, V*S = max - min).
    Identity on 1-channel images.
    """
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)  # (B, H, W)
    delta = maxc - minc
    inv = delta.clamp_min(torch.finfo(x.dtype).tiny).reciprocal_()  # where delta == 0, all numerators are 0
    # per-pixel choices as exact lerps with 0/1 weights: torch.where on random masks is branchy on CPU
    is_r, is_g = 1 - torch.sign(maxc - r), 1 - torch.sign(maxc - g)  # 1.0 where the channel is the max, else 0.0
    h6 = torch.lerp(torch.lerp((r - g).add_(delta, alpha=4), (b - r).add_(delta, alpha=2), is_g), g - b, is_r)
    h6 = h6.mul_(inv).add_(_col(factor, x).view(-1, 1, 1) * 6)  # shifted hue in sextants (any real)
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (h6.unsqueeze(1) + n).remainder_(6)  # (B, 3, H, W) in [0, 6)
    # max - delta * clamp(min(k, 4 - k), 0, 1) == (max - 2 delta) + delta * clamp(|k - 2|, 1, 2)
    c = k.sub_(2).abs_().clamp_(1, 2)
    return torch.addcmul((maxc - 2 * delta).unsqueeze(1), c, delta.unsqueeze(1))


class JitterParams(NamedTuple):
    """Per-sample parameters of ``color_jitter``.

    apply: (B,) bool, RandomApply's coin (True with probability p).
    order: (B, 4) int64, a uniform random permutation of 0..3 per sample (torchvision's fn_idx:
           0 brightness, 1 contrast, 2 saturation, 3 hue), the order in which the ops are applied.
    brightness, contrast, saturation: (B,) factors, uniform in [max(0, 1 - a), 1 + a].
    hue: (B,) uniform in [-a, a].
    """

    apply: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor


def sample_color_jitter(batch: int, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p: float = 0.8, *,
                        device=None, generator=None) -> JitterParams:
    """Parameters of ``RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p)``.

    Factor ranges as torchvision's ColorJitter for scalar arguments; the order is the argsort of 4 uniforms,
    which is a uniform random permutation like torch.randperm(4). An op with strength 0 gets the neutral
    factor (1, or 0 for hue), which is what torchvision's "None" (op skipped) amounts to.
    """
    u = _rand((batch, 9), device, generator)

    def factor(col, a):
        lo = max(0.0, 1.0 - a)
        return lo + (1.0 + a - lo) * u[:, col]

    return JitterParams(u[:, 0] < p, u[:, 1:5].argsort(dim=1), factor(5, brightness), factor(6, contrast),
                        factor(7, saturation), (2 * u[:, 8] - 1) * hue)


# Blend slots around the single hue step: a sample whose hue op is at position q (0..3) of its order runs its q
# earlier ops in the pre-hue slots 3-q..2 and its 3-q later ops in the post-hue slots 3..5-q, so slot s holds
# order[q + _SLOT_OFFSETS[s]] when that index lies in 0..3. Six cheap blend rounds and one hue round reproduce
# every per-sample order, instead of four rounds that would each evaluate all four ops (four hue conversions).
_SLOT_OFFSETS = (-3, -2, -1, 1, 2, 3)


def color_jitter(x: Tensor, params: JitterParams) -> Tensor:
    """RandomApply(ColorJitter) on (B, C, H, W), C in {1, 3}, with each sample's own factors and op order.

    Brightness, contrast and saturation are all the blend clamp(f * x + (1 - f) * m) with m = 0, the mean of
    the grayscale image, or the grayscale image; they run as six blend rounds where each sample picks its op
    (or the identity) per round, with the hue shift once in the middle (see _SLOT_OFFSETS). Samples with
    apply=False come back unchanged (exactly). Same formulas as torchvision's adjust_* on float tensors,
    including the clamp to [0, 1] after each op; results agree with torchvision to ~1e-6.
    """
    B = x.shape[0]
    order = params.order.to(x.device)
    q = (order == 3).to(torch.uint8).argmax(1, keepdim=True)  # position of hue in each sample's order
    offsets = torch.arange(6, device=x.device)
    pos = q + offsets - 3 + (offsets >= 3)  # (B, 6): q + _SLOT_OFFSETS
    valid = (pos >= 0) & (pos <= 3) & params.apply[:, None]
    ops = torch.where(valid, order.gather(1, pos.clamp(0, 3)), 3)  # (B, 6): 0, 1, 2 or 3 = identity
    one = torch.ones_like(params.brightness)
    f = torch.stack((params.brightness, params.contrast, params.saturation, one), 1).gather(1, ops)  # (B, 6)
    g = 1 - f
    coef = torch.stack((f, g * (ops == 2), g * (ops == 1)))  # weights of x, its grayscale image, its mean
    coef = coef.to(x.dtype).permute(2, 0, 1).reshape(6, 3, B, 1, 1, 1)
    hue_on = (params.apply & (params.hue != 0)).to(x.dtype).view(B, 1, 1, 1)

    for s in range(6):
        if s == 3:
            x = torch.lerp(x, adjust_hue(x, params.hue), hue_on)  # exact selection (weights 0 / 1)
        w_x, w_gray, w_mean = coef[s]
        gray = _gray(x)
        other = torch.addcmul(gray.mean(dim=(1, 2, 3), keepdim=True) * w_mean, gray, w_gray)
        # from the second round on, x is our own buffer: update it in place (the caller's x is never written)
        x = torch.addcmul(other, x, w_x, out=x if s else None).clamp_(0, 1)
    return x


def sample_grayscale(batch: int, p: float = 0.2, *, device=None, generator=None) -> Tensor:
    """(B,) bool, True with probability p, like ``RandomGrayscale(p)``."""
    return _rand(batch, device, generator) < p


def random_grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """(B, 3, H, W): the luma image replicated to 3 channels where apply (B,) is True, x elsewhere.
    1-channel images are returned unchanged (as torchvision)."""
    if x.shape[1] == 1:
        return x
    return torch.lerp(x, rgb_to_grayscale(x), apply.to(x.dtype).view(-1, 1, 1, 1))  # exact 0 / 1 selection


# --------------------------------------------------------------------------------------------------------------
# the trainer's pipelines

KINDS = ("sup", "scl", "none")


def _no_autocast(device_type: str):
    """Autocast off (a caller's autocast region must not run grid_sample in bf16); a no-op where unsupported."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return contextlib.nullcontext()


class BatchAugment:
    """Callable aug(x) -> x' for float (B, C, H, W) in [0, 1]: same dtype and device, (B, C, size, size).

    kind "sup": RandomCrop(size, padding=crop_padding) + RandomHorizontalFlip [+ RandomVerticalFlip] (the paper's
    Sup augmentation). kind "scl": RandomResizedCrop(size, scale=(0.2, 1)) + RandomHorizontalFlip
    [+ RandomVerticalFlip] + RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8) + RandomGrayscale(0.2), the
    SimCLR/SupCon views (Khosla et al. 2020); the colour ops only when channels == 3.
    Random parameters come from the RNG of x's device (or `generator`), so torch.manual_seed makes runs
    reproducible and restoring torch.get_rng_state / torch.cuda.get_rng_state replays them.
    """

    def __init__(self, kind: str, image_size, channels: int = 3, crop_padding: int = 4, hflip: bool = True,
                 vflip: bool = False, generator: Optional[torch.Generator] = None):
        if kind not in ("sup", "scl"):
            raise ValueError(f"unknown augmentation '{kind}'")
        self.kind, self.size, self.channels = kind, _size2(image_size), int(channels)
        self.crop_padding, self.hflip, self.vflip = int(crop_padding), bool(hflip), bool(vflip)
        self.colour = kind == "scl" and self.channels == 3
        self.generator = generator

    def __repr__(self):
        return (f"BatchAugment(kind={self.kind!r}, image_size={self.size}, channels={self.channels}, "
                f"crop_padding={self.crop_padding}, hflip={self.hflip}, vflip={self.vflip})")

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected (B, {self.channels}, H, W) images, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {x.dtype}")
        B, _, H, W = x.shape
        kw = dict(device=x.device, generator=self.generator)
        dtype = x.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.float()  # half / bfloat16: compute in float32, return in the input's dtype
        with _no_autocast(x.device.type):
            if self.kind == "sup":
                params = sample_crop_flip(B, (H, W), self.size, self.crop_padding, self.hflip, self.vflip, **kw)
                y = crop_flip(x, params, self.size, self.crop_padding)
            else:
                boxes = sample_resized_crop(B, (H, W), **kw)
                hflip = sample_flip(B, 0.5, **kw) if self.hflip else None
                vflip = sample_flip(B, 0.5, **kw) if self.vflip else None
                y = resized_crop(x, boxes, self.size, hflip, vflip)
                if self.colour:
                    y = color_jitter(y, sample_color_jitter(B, **kw))
                    y = random_grayscale(y, sample_grayscale(B, 0.2, **kw))
        return y.to(dtype)


def make_augment(kind: str, image_size, channels: int = 3, crop_padding: int = 4, hflip: bool = True,
                 vflip: bool = False, generator: Optional[torch.Generator] = None) -> Optional[BatchAugment]:
    """The trainer's batched augmentation: a BatchAugment for "sup" / "scl", None for "none"."""
    if kind == "none":
        return None
    return BatchAugment(kind, image_size, channels, crop_padding, hflip, vflip, generator)
