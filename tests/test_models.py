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
    assert len(hidden) == model.encoder.num_probes == 8  # stem, 6 blocks, final h
    assert [t.shape[1] for t in hidden] == [16, 32, 32, 64, 64, 128, 128, 128]
    assert torch.equal(hidden[-1], h)
    assert model.head(h).shape == (4, 128)


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
