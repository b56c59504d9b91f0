"""Tests of whatislost.metrics: PIEs, Q-Score, k-NN, prediction depth."""
import math

import numpy as np
import pytest
import torch

from whatislost import metrics
from whatislost.metrics import (
    depth_from_probe_predictions,
    format_mean_std,
    knn_predict,
    mean_std,
    modal_labels,
    pie_mask,
    prediction_depth,
    q_score,
)


# ------------------------------------------------------------------ PIEs
@pytest.fixture
def votes():
    # rows: 4 models; columns: 4 samples.
    #   sample 0: 1,1,2,0 -> mode 1
    #   sample 1: 0,2,2,0 -> tie {0, 2}
    #   sample 2: 3,3,3,3 -> mode 3
    #   sample 3: 2,1,1,2 -> tie {1, 2}
    return torch.tensor([[1, 0, 3, 2],
                         [1, 2, 3, 1],
                         [2, 2, 3, 1],
                         [0, 0, 3, 2]])


def test_modal_labels_min_rule(votes):
    labels, n_tied = modal_labels(votes, num_classes=4, tie_break="min")
    assert labels.tolist() == [1, 0, 3, 1]
    assert n_tied == 2


def test_modal_labels_max_rule(votes):
    labels, n_tied = modal_labels(votes, num_classes=4, tie_break="max")
    assert labels.tolist() == [1, 2, 3, 2]
    assert n_tied == 2


def test_modal_labels_rejects_bad_input(votes):
    with pytest.raises(ValueError):
        modal_labels(votes, num_classes=4, tie_break="random")
    with pytest.raises(ValueError):
        modal_labels(votes, num_classes=3)  # class 3 out of range


def test_modal_labels_matches_bincount_argmax():
    # the authors' per-sample rule: np.bincount(preds).argmax()
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 5, size=(6, 300))
    expected = [np.bincount(preds[:, i]).argmax() for i in range(preds.shape[1])]
    labels, _ = modal_labels(torch.from_numpy(preds), num_classes=5)
    assert labels.tolist() == expected


@pytest.fixture
def populations(votes):
    # pruned population: 3 models; sample 0 and 2 agree with the dense mode,
    # sample 1 unanimously 2 (dense mode tied 0/2), sample 3 unanimously 0.
    pruned = torch.tensor([[1, 2, 3, 0],
                           [1, 2, 3, 0],
                           [0, 2, 3, 0]])
    return votes, pruned


def test_pie_mask_min_rule(populations):
    dense, pruned = populations
    mask, n_tied = pie_mask(dense, pruned, num_classes=4, tie_break="min")
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, True, False, True]  # dense mode 0 vs pruned 2
    assert n_tied == 2


def test_pie_mask_max_rule(populations):
    dense, pruned = populations
    mask, n_tied = pie_mask(dense, pruned, num_classes=4, tie_break="max")
    assert mask.tolist() == [False, False, False, True]  # dense mode 2 == pruned 2
    assert n_tied == 2


def test_pie_mask_ignores_true_label_and_counts_ties_once():
    # both populations agree on a (wrong) class 1 for sample 0: not a PIE.
    # sample 1 is tied in both populations: counted once.
    dense = torch.tensor([[1, 0], [1, 1]])
    pruned = torch.tensor([[1, 1], [1, 0]])
    mask, n_tied = pie_mask(dense, pruned, num_classes=2)
    assert mask.tolist() == [False, False]
    assert n_tied == 1


# --------------------------------------------------------------- Q-Score
def test_q_score_hand_computed():
    # sample A: u = [0.6, 0, 0, 0.8]; mean 0.35; squared deviations sum 0.51
    #           population std sqrt(0.51 / 4); Z = (0.8 - 0.35) / std; L1 = 1.4
    za = 0.45 / math.sqrt(0.51 / 4)
    a = q_score(torch.tensor([[3.0, 0.0, 0.0, 4.0]]))
    assert a["l1"].item() == pytest.approx(1.4)
    assert a["z"].item() == pytest.approx(za)
    assert a["q"].item() == pytest.approx(za / 1.4)
    # sample B, raw x = [1, 1, 1, 1, -2]: Z is scale-free so use x directly:
    #           mean 0.4, population variance (4 * 0.36 + 5.76) / 5 = 1.44, std 1.2,
    #           Z = 0.6 / 1.2 = 0.5 (the unbiased std would give 0.447);
    #           u = x / sqrt(8) so L1 = 6 / sqrt(8)
    b = q_score(torch.tensor([[1.0, 1.0, 1.0, 1.0, -2.0]]) * 7.0)
    assert b["z"].item() == pytest.approx(0.5)
    assert b["l1"].item() == pytest.approx(6 / math.sqrt(8))
    assert b["q"].item() == pytest.approx(0.5 * math.sqrt(8) / 6)


def test_q_score_batch_shapes_and_scale_invariance():
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    out = q_score(h)
    scaled = q_score(h * 1000.0)
    for key in ("q", "z", "l1"):
        assert out[key].shape == (5,)
        torch.testing.assert_close(out[key], scaled[key])


def test_q_score_degenerate_rows():
    h = torch.tensor([[2.0, 2.0, 2.0, 2.0],     # all features equal: std 0
                      [0.0, 0.0, 0.0, 0.0],     # all zero: no direction
                      [0.1, 0.1, 0.1, 0.1]])
    out = q_score(h)
    for key in ("q", "z", "l1"):
        assert torch.isfinite(out[key]).all()
    assert out["z"].tolist() == [0.0, 0.0, 0.0]
    assert out["q"].tolist() == [0.0, 0.0, 0.0]
    assert out["l1"][0].item() == pytest.approx(2.0)  # 4 * (1 / 2)
    assert out["l1"][1].item() == 0.0


# ------------------------------------------------------------------- kNN
@pytest.fixture
def knn_data():
    g = torch.Generator().manual_seed(1)
    num_classes = 4
    centres = torch.randn(num_classes, 16, generator=g) * 1.5
    ref_labels = torch.randint(0, num_classes, (600,), generator=g)
    refs = centres[ref_labels] + torch.randn(600, 16, generator=g)
    queries = centres[torch.randint(0, num_classes, (250,), generator=g)] + torch.randn(250, 16, generator=g)
    return refs, ref_labels, queries, num_classes


def _sklearn_predict(refs, labels, queries, k):
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k, weights="uniform", algorithm="brute")
    clf.fit(refs.numpy(), labels.numpy())
    return torch.from_numpy(clf.predict(queries.numpy()))


@pytest.mark.parametrize("k", [1, 6, 30])
@pytest.mark.parametrize("chunk_size", [None, 17])
def test_knn_matches_sklearn(knn_data, k, chunk_size):
    refs, labels, queries, num_classes = knn_data
    ours = knn_predict(refs, labels, queries, k=k, num_classes=num_classes, chunk_size=chunk_size)
    assert ours.device.type == "cpu" and ours.dtype == torch.long
    assert torch.equal(ours, _sklearn_predict(refs, labels, queries, k))


def test_knn_tiny_block_budget_and_float64(knn_data):
    refs, labels, queries, num_classes = knn_data
    assert metrics._auto_chunk(600, 1000, 4) == 1
    ours = knn_predict(refs.double(), labels, queries.double(), k=10, block_bytes=1000)
    assert torch.equal(ours, _sklearn_predict(refs, labels, queries, 10))


@pytest.mark.parametrize("rows, group_size, num_groups, m", [(6, 5, 40, 38), (4, 1, 50, 10), (5, 13, 9, 9)])
def test_grouped_selection_is_exact(rows, group_size, num_groups, m):
    block = torch.randn(rows, group_size * num_groups, generator=torch.Generator().manual_seed(3))
    picked = metrics._smallest_m(block, m, num_groups).sort(dim=1).values
    expected = block.topk(m, dim=1, largest=False).indices.sort(dim=1).values
    assert torch.equal(picked, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_on_cuda_matches_cpu_and_sklearn(knn_data):
    refs, labels, queries, num_classes = knn_data
    on_gpu = knn_predict(refs, labels, queries, k=30, num_classes=num_classes, chunk_size=64, device="cuda")
    assert on_gpu.device.type == "cpu"
    assert torch.equal(on_gpu, knn_predict(refs, labels, queries, k=30, num_classes=num_classes))
    assert torch.equal(on_gpu, _sklearn_predict(refs, labels, queries, 30))


def test_knn_vote_tie_goes_to_smallest_class():
    # 1-D: class 3 at 0.0 and 0.1, class 1 at 1.0 and 1.1; query at 0.55 sees all four.
    refs = torch.tensor([[0.0], [0.1], [1.0], [1.1]])
    labels = torch.tensor([3, 3, 1, 1])
    query = torch.tensor([[0.55], [0.05]])
    ours = knn_predict(refs, labels, query, k=4)
    assert ours.tolist() == [1, 1]
    assert torch.equal(ours, _sklearn_predict(refs, labels, query, 4))


# ------------------------------------------------------- prediction depth
def test_depth_from_probe_predictions_conventions():
    # 4 probes x 5 samples; reference all 0.
    preds = torch.tensor([[0, 1, 1, 1, 0],
                          [0, 0, 1, 1, 1],
                          [0, 0, 0, 1, 0],
                          [0, 0, 0, 1, 0]])
    ref = torch.zeros(5, dtype=torch.long)
    # agreeing suffix starts at probe (0-based): 0, 1, 2, 4 (never), 2
    assert depth_from_probe_predictions(preds, ref, "baldock").tolist() == [0, 1, 2, 4, 2]
    assert depth_from_probe_predictions(preds, ref, "authors").tolist() == [1, 1, 2, 4, 2]
    with pytest.raises(ValueError):
        depth_from_probe_predictions(preds, ref, "one-based")


@pytest.fixture
def staged_probes():
    """Four probes; two tight clusters (class 0 at -10, class 1 at +10) at every probe.

    Each test sample sits on the wrong cluster at the probes listed in `wrong`
    and on its own class's cluster elsewhere, so its depth is known by construction.
    """
    g = torch.Generator().manual_seed(2)
    num_probes, per_class = 4, 40
    train_labels = torch.arange(2).repeat_interleave(per_class)
    centre = torch.tensor([[-10.0, 0.0], [10.0, 0.0]])
    train = [centre[train_labels] + 0.5 * torch.randn(2 * per_class, 2, generator=g) for _ in range(num_probes)]
    wrong = [[], [0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [1], [3]]
    expected_baldock = [0, 1, 2, 3, 4, 2, 4]
    test_labels = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    test = []
    for p in range(num_probes):
        shown = torch.tensor([1 - y if p in w else y for y, w in zip(test_labels.tolist(), wrong)])
        test.append(centre[shown] + 0.5 * torch.randn(len(wrong), 2, generator=g))
    return train, train_labels, test, test_labels, torch.tensor(expected_baldock), wrong


def test_prediction_depth_known_by_construction(staged_probes):
    train, train_labels, test, test_labels, expected, wrong = staged_probes
    depth, probe_preds = prediction_depth(train, train_labels, test, test_labels, k=30,
                                          convention="baldock", return_probe_preds=True, chunk_size=3)
    assert depth.tolist() == expected.tolist()
    assert probe_preds.shape == (4, len(wrong))
    for i, w in enumerate(wrong):
        for p in range(4):
            assert (probe_preds[p, i] != test_labels[i]).item() == (p in w)
    authors = prediction_depth(train, train_labels, test, test_labels, k=30)
    assert authors.tolist() == expected.clamp(min=1).tolist()


def test_prediction_depth_against_network_prediction(staged_probes):
    # Baldock's reference: the network's final prediction. Suppose the network
    # predicts what the last probe says for sample 6 (shown on the wrong cluster
    # only at probe 3): against that reference probes 0-2 disagree, so depth 3.
    train, train_labels, test, test_labels, expected, wrong = staged_probes
    final_pred = test_labels.clone()
    final_pred[6] = 1 - test_labels[6]
    depth = prediction_depth(train, train_labels, test, final_pred, convention="baldock")
    assert depth[6].item() == 3
    assert depth[:6].tolist() == expected[:6].tolist()


# --------------------------------------------------------------- helpers
def test_mean_std_population():
    m, s = mean_std(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == pytest.approx(2.5)
    assert s == pytest.approx(math.sqrt(1.25))
    assert format_mean_std(torch.tensor([14.0, 16.0])) == "15.00±1.00"


def test_q_score_nan_or_infinite_rows_are_nan_not_zero():
    nan, inf = math.nan, math.inf
    h = torch.tensor([[1.0, 2.0, 3.0, 0.5],
                      [nan, 1.0, 1.0, 1.0],     # a NaN feature: once sent to the zero vector, Q = 0
                      [inf, 1.0, 1.0, 1.0],
                      [-inf, 0.0, 0.0, 0.0],
                      [2.0, 2.0, 2.0, 2.0],     # constant row: convention z = q = 0
                      [0.0, 0.0, 0.0, 0.0]])    # all zero: convention l1 = z = q = 0
    out = q_score(h)
    for key in ("q", "z", "l1"):
        assert torch.isnan(out[key][1:4]).all(), key
        assert torch.isfinite(out[key][[0, 4, 5]]).all(), key
        torch.testing.assert_close(out[key][:1], q_score(h[:1])[key])
    assert out["q"][4:].tolist() == [0.0, 0.0] and out["z"][4:].tolist() == [0.0, 0.0]
    assert out["l1"][5].item() == 0.0 and out["l1"][4].item() == pytest.approx(2.0)


def test_q_score_finite_rows_of_any_scale():
    # ||h||_2 of these overflows / underflows in float64; the scores must still be those of [1, 0, 2, 0.5]
    base = torch.tensor([[1.0, 0.0, 2.0, 0.5]], dtype=torch.float64)
    ref = q_score(base)
    for scale in (1e300, 1e-200):
        out = q_score(base * scale)
        for key in ("q", "z", "l1"):
            torch.testing.assert_close(out[key], ref[key])


def test_mean_std_does_not_hide_nan():
    m, s = mean_std(torch.tensor([1.0, math.nan, 3.0]))
    assert math.isnan(m) and math.isnan(s)
    assert mean_std([])[0] != mean_std([])[0]  # NaN for no values
    assert mean_std([83.0, 82.99]) == (pytest.approx(82.995), pytest.approx(0.005))
