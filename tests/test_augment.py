"""whatislost.augment against torchvision: each op with the same parameters, and the parameter distributions.

Reference ops are torchvision.transforms.v2.functional applied image by image; reference samplers are the
get_params of torchvision.transforms (v1: RandomCrop, RandomResizedCrop, ColorJitter), drawn in Python loops.
"""
import itertools
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torchvision.transforms import InterpolationMode

from whatislost import augment as A

P_MIN = 1e-3  # two-sample tests under fixed seeds: deterministic, with a margin against a lucky seed


def images(b, c=3, h=32, w=32, seed=0):
    """uint8-valued float images in [0, 1]: exact ties between channels, pure black/white/grey pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g).float().div_(255)
    x[0] = 0.5  # a grey image
    x[1, :, :4] = 1.0  # saturated rows
    x[1, :, 4:8] = 0.0
    return x


def per_image(x, fn):
    return torch.stack([fn(i, x[i]) for i in range(len(x))])


# ----------------------------------------------------------------------------------------------------------
# the ops, with the same parameters as torchvision's functional ops


@pytest.mark.parametrize("c,h,w,size,pad", [(3, 32, 32, 32, 4), (1, 8, 8, 8, 2), (3, 24, 40, (20, 36), 3)])
def test_crop_flip_matches_torchvision_exactly(c, h, w, size, pad):
    x = images(24, c, h, w)
    p = A.sample_crop_flip(len(x), (h, w), size, pad, hflip=True, vflip=True)
    th, tw = (size, size) if isinstance(size, int) else size

    def ref(i, im):
        out = TF.crop(TF.pad(im, [pad]), int(p.top[i]), int(p.left[i]), th, tw)
        out = TF.horizontal_flip(out) if p.hflip[i] else out
        return TF.vertical_flip(out) if p.vflip[i] else out

    y = A.crop_flip(x, p, size, pad)
    assert torch.equal(y, per_image(x, ref))
    assert p.hflip.any() and (~p.hflip).any() and p.vflip.any() and (~p.vflip).any()
    assert p.top.max() <= h + 2 * pad - th and p.left.max() <= w + 2 * pad - tw


def _boxes(*rows):
    t = torch.tensor(rows).T
    return A.Boxes(*t)


@pytest.mark.parametrize("antialias", [True, False])
def test_resized_crop_matches_torchvision_when_upscaling(antialias):
    """Crops of a 32x32 image resized to 32x32 (the trainer's case): the antialias filter does not apply."""
    x = images(40)
    boxes = A.sample_resized_crop(32, 32)
    extra = _boxes((0, 0, 32, 32), (31, 31, 1, 1), (0, 20, 7, 12), (25, 0, 7, 32), (3, 5, 17, 9), (0, 0, 2, 3),
                   (30, 29, 2, 3), (10, 10, 13, 13))
    boxes = A.Boxes(*(torch.cat((a, b)) for a, b in zip(boxes, extra)))
    hflip, vflip = A.sample_flip(40), A.sample_flip(40)

    def ref(i, im):
        out = TF.resized_crop(im, int(boxes.top[i]), int(boxes.left[i]), int(boxes.height[i]), int(boxes.width[i]),
                              [32, 32], InterpolationMode.BILINEAR, antialias=antialias)
        out = TF.horizontal_flip(out) if hflip[i] else out
        return TF.vertical_flip(out) if vflip[i] else out

    y = A.resized_crop(x, boxes, 32, hflip, vflip)
    torch.testing.assert_close(y, per_image(x, ref), atol=1e-5, rtol=0)
    whole = x[32].flip(-1) if hflip[32] else x[32]
    torch.testing.assert_close(y[32], whole.flip(-2) if vflip[32] else whole, atol=1e-5, rtol=0)  # a copy


def test_resized_crop_matches_torchvision_bilinear_without_antialias_when_downscaling():
    """Larger boxes and non-square sizes: plain bilinear (antialias=False) throughout."""
    x = images(24, 3, 48, 40)
    boxes = A.sample_resized_crop(24, (48, 40), scale=(0.3, 1.0))
    y = A.resized_crop(x, boxes, (20, 28))
    ref = per_image(x, lambda i, im: TF.resized_crop(
        im, int(boxes.top[i]), int(boxes.left[i]), int(boxes.height[i]), int(boxes.width[i]), [20, 28],
        InterpolationMode.BILINEAR, antialias=False))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


COLOUR_OPS = [
    (A.adjust_brightness, TF.adjust_brightness, (0.0, 2.0)),
    (A.adjust_contrast, TF.adjust_contrast, (0.0, 2.0)),
    (A.adjust_saturation, TF.adjust_saturation, (0.0, 2.0)),
    (A.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
]


@pytest.mark.parametrize("ours,theirs,lohi", COLOUR_OPS, ids=["brightness", "contrast", "saturation", "hue"])
def test_colour_op_matches_torchvision(ours, theirs, lohi):
    x = images(48, 3, 16, 16)
    f = torch.linspace(*lohi, len(x))
    y = ours(x, f)
    torch.testing.assert_close(y, per_image(x, lambda i, im: theirs(im, float(f[i]))), atol=1e-5, rtol=0)
    assert y.min() >= 0 and y.max() <= 1
    x1 = images(4, 1, 8, 8)  # 1-channel images, like torchvision (saturation and hue: identity)
    torch.testing.assert_close(ours(x1, f[:4]), per_image(x1, lambda i, im: theirs(im, float(f[i]))),
                               atol=1e-6, rtol=0)


def test_color_jitter_matches_torchvision_in_every_order():
    """All 24 orders twice, RandomApply's coin mixed; torchvision applies the four ops one after the other."""
    x = images(48, 3, 16, 16, seed=1)
    p = A.sample_color_jitter(len(x))
    order = torch.tensor(list(itertools.permutations(range(4))) * 2)
    apply = torch.arange(len(x)) % 5 != 0
    p = p._replace(order=order, apply=apply)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [p.brightness, p.contrast, p.saturation, p.hue]

    def ref(i, im):
        if apply[i]:
            for op in order[i].tolist():
                im = ops[op](im, float(factors[op][i]))
        return im

    y = A.color_jitter(x, p)
    torch.testing.assert_close(y, per_image(x, ref), atol=2e-5, rtol=0)
    assert torch.equal(y[~apply], x[~apply])  # not applied: untouched
    before = x.clone()
    A.color_jitter(x, p)
    assert torch.equal(x, before)  # no in-place change of the input


def test_grayscale_matches_torchvision():
    x = images(16, 3, 8, 8)
    apply = torch.arange(16) % 3 == 0
    ref = per_image(x, lambda i, im: TF.rgb_to_grayscale(im, num_output_channels=3) if apply[i] else im)
    assert torch.equal(A.random_grayscale(x, apply), ref)
    x1 = images(4, 1, 8, 8)
    assert torch.equal(A.random_grayscale(x1, torch.ones(4, dtype=torch.bool)), x1)


# ----------------------------------------------------------------------------------------------------------
# the parameter distributions, against torchvision's samplers


def _same_distribution(a, b):
    """Two-sample KS on each column: p-values above P_MIN."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    for k in range(a.shape[1]):
        p = stats.ks_2samp(a[:, k].numpy(), b[:, k].numpy()).pvalue
        assert p > P_MIN, (k, p, a[:, k].mean().item(), b[:, k].mean().item())


def _same_counts(a, b, n_values):
    """Chi-square test of homogeneity of two samples of integers in [0, n_values)."""
    table = torch.stack((torch.bincount(torch.as_tensor(a), minlength=n_values),
                         torch.bincount(torch.as_tensor(b), minlength=n_values)))
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table.numpy()).pvalue > P_MIN, table


def _near(rate, p, n):
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)


def test_crop_offsets_and_flips_follow_torchvision():
    n, pad = 4000, 4
    torch.manual_seed(0)
    p = A.sample_crop_flip(n, 32, 32, pad, vflip=True)
    padded = torch.zeros(3, 32 + 2 * pad, 32 + 2 * pad)
    theirs = torch.tensor([T.RandomCrop.get_params(padded, (32, 32))[:2] for _ in range(n)])
    _same_counts(p.top, theirs[:, 0], 2 * pad + 1)
    _same_counts(p.left, theirs[:, 1], 2 * pad + 1)
    assert stats.chisquare(torch.bincount(p.top).numpy()).pvalue > P_MIN  # uniform on 0..2p
    for flips in (p.hflip, p.vflip):
        _near(flips.float().mean().item(), 0.5, n)
    assert not A.sample_crop_flip(100, 32, 32, pad, hflip=False).hflip.any()


@pytest.mark.parametrize("hw,scale,ratio", [
    ((32, 32), (0.2, 1.0), (3 / 4, 4 / 3)),  # the SCL views
    ((20, 48), (0.5, 1.0), (0.25, 4.0)),  # many rejected attempts and fallbacks
])
def test_resized_crop_boxes_follow_torchvision(hw, scale, ratio):
    n = 3000
    torch.manual_seed(0)
    ours = torch.stack(A.sample_resized_crop(n, hw, scale, ratio), 1)
    img = torch.zeros(1, *hw)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])
    assert (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()
    assert (ours[:, 0] + ours[:, 2] <= hw[0]).all() and (ours[:, 1] + ours[:, 3] <= hw[1]).all()
    area = lambda b: (b[:, 2] * b[:, 3])[:, None]  # noqa: E731
    _same_distribution(torch.cat((ours, area(ours)), 1), torch.cat((theirs, area(theirs)), 1))


@pytest.mark.parametrize("hw", [(32, 32), (10, 40), (40, 10), (30, 33)])
def test_resized_crop_fallback_is_torchvisions_central_crop(hw):
    """scale > 1 never fits: every sample takes the fallback, which is deterministic."""
    scale, ratio = (2.0, 3.0), (3 / 4, 4 / 3)
    ours = torch.stack(A.sample_resized_crop(8, hw, scale, ratio), 1)
    theirs = T.RandomResizedCrop.get_params(torch.zeros(1, *hw), list(scale), list(ratio))
    assert ours.tolist() == [list(theirs)] * 8


def test_color_jitter_and_grayscale_parameters_follow_torchvision():
    n = 3000
    torch.manual_seed(0)
    p = A.sample_color_jitter(n)
    rng = [[0.6, 1.4]] * 3 + [[-0.1, 0.1]]
    theirs = [T.ColorJitter.get_params(*rng) for _ in range(n)]
    _same_distribution(torch.stack((p.brightness, p.contrast, p.saturation, p.hue), 1),
                       torch.tensor([t[1:] for t in theirs]))
    code = lambda orders: torch.tensor([  # noqa: E731  permutation -> index 0..23
        sum(int(v) * 4 ** k for k, v in enumerate(o)) for o in orders])
    perms = {c: i for i, c in enumerate(code(itertools.permutations(range(4))).tolist())}
    ours_idx = torch.tensor([perms[c] for c in code(p.order).tolist()])
    theirs_idx = torch.tensor([perms[c] for c in code([t[0] for t in theirs]).tolist()])
    _same_counts(ours_idx, theirs_idx, 24)
    assert stats.chisquare(torch.bincount(ours_idx, minlength=24).numpy()).pvalue > P_MIN
    _near(p.apply.float().mean().item(), 0.8, n)
    _near(A.sample_grayscale(n).float().mean().item(), 0.2, n)
    _near(A.sample_flip(n).float().mean().item(), 0.5, n)


# ----------------------------------------------------------------------------------------------------------
# the trainer's pipelines


@pytest.mark.parametrize("kind,channels,size", [("sup", 3, 32), ("scl", 3, 32), ("sup", 1, 8), ("scl", 1, 8)])
def test_pipelines_keep_shape_range_and_follow_the_seed(kind, channels, size):
    aug = A.make_augment(kind, size, channels, crop_padding=2, vflip=True)
    x = images(16, channels, size, size)
    torch.manual_seed(1)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
    torch.manual_seed(1)
    assert torch.equal(aug(x), y)
    state = torch.get_rng_state()
    z = aug(x)
    assert not torch.equal(z, y)
    torch.set_rng_state(state)  # a resumed run replays the same views
    assert torch.equal(aug(x), z)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(A.make_augment(kind, size, channels, 2, vflip=True, generator=g)(x), y)
    assert aug(x.bfloat16()).dtype == torch.bfloat16


def test_scl_pipeline_is_the_composition_of_the_ops():
    """RandomResizedCrop -> flips -> RandomApply(ColorJitter) -> RandomGrayscale, with torchvision per image."""
    x = images(32)
    torch.manual_seed(3)
    y = A.make_augment("scl", 32, 3, vflip=True)(x)
    torch.manual_seed(3)
    boxes, hflip, vflip = A.sample_resized_crop(32, 32), A.sample_flip(32), A.sample_flip(32)
    jitter, gray = A.sample_color_jitter(32), A.sample_grayscale(32)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    factors = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]

    def ref(i, im):
        im = TF.resized_crop(im, int(boxes.top[i]), int(boxes.left[i]), int(boxes.height[i]), int(boxes.width[i]),
                             [32, 32], InterpolationMode.BILINEAR, antialias=True)
        im = TF.horizontal_flip(im) if hflip[i] else im
        im = TF.vertical_flip(im) if vflip[i] else im
        if jitter.apply[i]:
            for op in jitter.order[i].tolist():
                im = ops[op](im, float(factors[op][i]))
        return TF.rgb_to_grayscale(im, num_output_channels=3) if gray[i] else im

    torch.testing.assert_close(y, per_image(x, ref), atol=2e-5, rtol=0)


def test_sup_pipeline_is_crop_and_flip():
    x = images(32)
    torch.manual_seed(4)
    y = A.make_augment("sup", 32, 3, crop_padding=4)(x)
    torch.manual_seed(4)
    assert torch.equal(y, A.crop_flip(x, A.sample_crop_flip(32, 32, 32, 4), 32, 4))


def test_factory_kinds():
    assert A.make_augment("none", 32) is None
    with pytest.raises(ValueError):
        A.make_augment("cutout", 32)
    with pytest.raises(ValueError):
        A.make_augment("scl", 32, 3)(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError):
        A.make_augment("sup", 32, 3)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region changes nothing
        torch.manual_seed(0)
        y = A.make_augment("scl", 32, 3)(images(4))
    torch.manual_seed(0)
    assert torch.equal(y, A.make_augment("scl", 32, 3)(images(4)))
    from whatislost.augment import make_augment

    aug = make_augment("scl", 8, 1, crop_padding=2, hflip=False, vflip=True)
    assert isinstance(aug, A.BatchAugment) and not aug.colour and aug.vflip and not aug.hflip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync():
    x = images(64)
    dev = torch.device("cuda")
    xc = x.to(dev)
    for kind in ("sup", "scl"):
        aug = A.make_augment(kind, 32, 3)
        aug(xc)  # warm up (lazy init may synchronise)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = aug(xc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert y.device == xc.device and y.shape == xc.shape
    boxes = A.sample_resized_crop(64, 32)
    jitter = A.sample_color_jitter(64)
    cpu = A.color_jitter(A.resized_crop(x, boxes, 32), jitter)
    gpu = A.color_jitter(A.resized_crop(xc, A.Boxes(*(t.to(dev) for t in boxes)), 32),
                         A.JitterParams(*(t.to(dev) for t in jitter)))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    torch.manual_seed(0)
    a = A.make_augment("scl", 32, 3)(xc)
    torch.manual_seed(0)
    assert torch.equal(A.make_augment("scl", 32, 3)(xc), a)
