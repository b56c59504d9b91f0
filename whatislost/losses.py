"""Losses: supervised contrastive (SupCon) loss of Khosla et al. 2020.

Cross-entropy comes from torch (`F.cross_entropy` with optional label smoothing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5,
                base_temperature: float | None = None) -> torch.Tensor:
    """SupCon loss, Khosla et al. 2020, eq. 2 (L^sup_out).

    features: (B, V, D) projections of V augmented views of B images (normalised here).
    labels:   (B,) class ids. Every other view of the same class is a positive.

        L = mean_i  -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )

    over all 2B anchors i. Anchors without positives (possible only with V=1) are skipped.

    base_temperature: SupContrast's reference code (and Corti et al.'s utils/losses.py, called
    with base_temperature=0.07) multiplies the loss by temperature / base_temperature (0.5/0.07,
    about 7.1). Under SGD that is not a mere rescaling: it scales the loss's gradient against
    an unchanged weight decay, i.e. a 7.1x larger effective learning rate on the loss. None
    (the default) applies no factor.
    """
    b, v, _ = features.shape
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(b * v, -1)  # view-major, (BV, D)
    y = labels.repeat(v)
    logits = z @ z.T / temperature
    self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    mean_log_prob_pos = log_prob.masked_fill(~positives, 0.0).sum(1) / n_pos.clamp_min(1)
    # a masked mean, not mean_log_prob_pos[has_pos]: boolean indexing would wait for the GPU every step
    has_pos = (n_pos > 0).float()
    loss = -(mean_log_prob_pos * has_pos).sum() / has_pos.sum().clamp_min(1)
    return loss if base_temperature is None else loss * (temperature / base_temperature)
