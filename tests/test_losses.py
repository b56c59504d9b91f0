import math

import pytest
import torch

from whatislost.losses import supcon_loss


def test_supcon_matches_hand_computed_case():
    # two images, two identical views each, orthogonal classes, temperature 1:
    # every anchor has one positive (dot 1) and two negatives (dot 0), so
    # loss = -(1 - log(e + 2)) for every anchor.
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    loss = supcon_loss(feats, torch.tensor([0, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 1, rel=1e-6)


def test_supcon_counts_same_class_images_as_positives():
    # same two images, now one class: for anchor 0 the positives are its other view (dot 1)
    # and both views of image 1 (dot 0), temperature 0.5 -> logits 2, 0, 0.
    feats = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
    loss = supcon_loss(feats, torch.tensor([3, 3]), temperature=0.5)
    log_denominator = math.log(math.exp(2) + 2)
    expected = -((2 - log_denominator) + 2 * (0 - log_denominator)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_supcon_normalises_features_and_has_gradients():
    feats = torch.randn(8, 2, 16, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    loss = supcon_loss(feats, labels)
    assert torch.allclose(loss, supcon_loss(feats.detach() * 5, labels))
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def supcontrast_reference(features, labels, temperature, base_temperature):
    """SupContrast's formula written out independently (Khosla et al. 2020, contrast_mode 'all'):
    per anchor, logits against every other view minus their max, log-softmax over non-self, mean
    over positives, times -(t / base_t), averaged over anchors. Loops, float64."""
    b, v, _ = features.shape
    z = torch.nn.functional.normalize(features.double(), dim=-1)
    anchors = [(i, a) for a in range(v) for i in range(b)]  # view-major like torch.cat(unbind(dim=1))
    total = 0.0
    for i, a in anchors:
        logits = torch.stack([z[i, a] @ z[j, c] / temperature for j, c in anchors])
        logits = logits - logits.max()
        others = [k for k, (j, c) in enumerate(anchors) if (j, c) != (i, a)]
        log_denominator = torch.logsumexp(logits[others], 0)
        positives = [k for k in others if labels[anchors[k][0]] == labels[i]]
        mean_log_prob = sum(logits[k] - log_denominator for k in positives) / len(positives)
        total += -(temperature / base_temperature) * mean_log_prob
    return total / len(anchors)


def test_supcon_base_temperature_matches_supcontrast_and_scales_by_t_over_base_t():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 2, 8, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    scaled = supcon_loss(feats, labels, 0.5, base_temperature=0.07)
    assert scaled.item() == pytest.approx(supcontrast_reference(feats, labels, 0.5, 0.07).item(), rel=1e-5)
    unscaled = supcon_loss(feats, labels, 0.5)
    assert scaled.item() == pytest.approx(unscaled.item() * 0.5 / 0.07, rel=1e-6)
