import torch

from whatislost.models import WideResNet, count_parameters


def test_wrn16_2_has_the_published_parameter_count():
    model = WideResNet(16, 2, in_channels=3, num_classes=10)
    assert count_parameters(model) == 691_674


def test_shapes_and_hidden_representations():
    model = WideResNet(16, 2, in_channels=3, num_classes=10, projection_head=True).eval()
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    h, hidden = model.encoder(x, return_hidden=True)
    assert h.shape == (4, 128)
    assert len(hidden) == model.encoder.num_probes() == 8  # stem, 6 blocks, final h
    assert [t.shape[1] for t in hidden] == [16, 32, 32, 64, 64, 128, 128, 128]
    assert torch.equal(hidden[-1], h)
    assert model.head(h).shape == (4, 128)


def test_authors_probe_layout_has_16_probes_on_wrn16_2():
    # Corti et al.'s code: stem, then per block relu(bn2(conv1)), conv2 before the sum, and the block
    # output where there is no shortcut conv: first block of a group 2 probes, second 3 -> 1 + 3 * 5
    model = WideResNet(16, 2).eval()
    x = torch.randn(2, 3, 32, 32)
    h, hidden = model.encoder(x, return_hidden=True, probes="authors")
    assert len(hidden) == model.encoder.num_probes("authors") == 16
    assert [t.shape[1] for t in hidden] == [16] + [32] * 5 + [64] * 5 + [128] * 5
    assert torch.equal(h, model.encoder(x))
    # the last probe is the final block's raw output, not h (which is after the final BN-ReLU)
    assert not torch.allclose(hidden[-1], h)
    assert WideResNet(10, 1).encoder.num_probes("authors") == 1 + 3 + 2 + 2  # the 16->16 block keeps its input shape


def test_projection_head_is_not_among_pruned_names():
    import re

    model = WideResNet(16, 2, projection_head=True)
    pattern = re.compile(r"^(encoder\..*conv.*|classifier)\.weight$")
    names = [n for n, _ in model.named_parameters() if pattern.match(n)]
    assert "classifier.weight" in names and "encoder.conv.weight" in names
    assert not any(n.startswith("head.") or ".bn" in n for n in names)
    # every conv and linear weight of encoder + classifier, nothing else
    convs = [n + ".weight" for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not n.startswith("head")]
    assert sorted(names) == sorted(convs)
