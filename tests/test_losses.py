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
