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


# ---------------------------------------------------------------- ResNet-18 (arch: resnet18)
def test_resnet18_is_the_cifar_resnet18():
    from whatislost.models import ResNet18, build_model

    model = ResNet18(3, 10)
    assert count_parameters(model) == 11_173_962  # the CIFAR ResNet-18 (3x3 stem, no max-pool)
    assert model.encoder.conv.kernel_size == (3, 3) and model.encoder.conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 10) and model.encoder(x).shape == (2, 512)
    # checkpoints store the arch dict; build_model rebuilds either architecture
    assert model.arch == {"name": "resnet18", "in_channels": 3, "num_classes": 10}
    rebuilt = build_model(model.arch)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert type(build_model(WideResNet(10, 1).arch)) is WideResNet  # older checkpoints: no 'name'


def test_resnet18_probe_layouts():
    from whatislost.models import ResNet18, num_probes

    model = ResNet18(1, 10).eval()
    x = torch.randn(2, 1, 8, 8)  # digits: 8 -> 4 -> 2 -> 1
    h, hidden = model.encoder(x, return_hidden=True)  # stem, 8 block outputs; the last one is h
    assert len(hidden) == model.encoder.num_probes() == 9
    assert [t.shape[1] for t in hidden] == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    assert torch.equal(hidden[-1], h)
    h2, authors = model.encoder(x, return_hidden=True, probes="authors")
    # per block: relu(bn1(conv1)), bn2(conv2) before the sum, the output where there is no shortcut conv
    assert len(authors) == model.encoder.num_probes("authors") == 1 + 3 + 3 + 3 * (2 + 3) == 22
    assert torch.equal(h2, h) and torch.allclose(authors[-1], h)
    assert num_probes({"arch": "resnet18"}, "authors") == 22 and num_probes({"depth": 16, "widen": 2}, "authors") == 16


def test_resnet18_convolutions_are_what_the_recipes_prune():
    import re

    from whatislost.models import ResNet18

    model = ResNet18(3, 10, projection_head=True)
    pattern = re.compile(r"^(encoder\..*conv.*|classifier)\.weight$")
    names = [n for n, _ in model.named_parameters() if pattern.match(n)]
    convs = [n + ".weight" for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not n.startswith("head")]
    assert sorted(names) == sorted(convs) and len(names) == 1 + 16 + 3 + 1  # stem, blocks, shortcuts, classifier
    assert not any("bn" in n or n.startswith("head.") for n in names)


def test_model_names_follow_the_arch_key():
    from whatislost.config import TrainConfig, validate
    from whatislost.models import model_label

    assert TrainConfig(arch="resnet18").model_name == "resnet18" == model_label({"arch": "resnet18"})
    assert TrainConfig(depth=10, widen=1).model_name == "wrn10-1" == model_label({"depth": 10, "widen": 1})
    assert validate(TrainConfig(arch="resnet18", depth=7)).arch == "resnet18"  # depth is WideResNet's only


def test_a_resnet18_run_trains_prunes_and_exports(tmp_path, digits):
    """A ResNet-18 on a slice of digits: GMP reaches its target, load_model rebuilds it, whatislost-export checks it."""
    from conftest import tiny_config
    from whatislost.export import export_run
    from whatislost.rundir import load_model
    from whatislost.train import train

    cfg = tiny_config(tmp_path / "r18", arch="resnet18", recipe="recipes/gmp.yaml", sparsity=0.5, epochs=1,
                      train_per_class=12, test_per_class=8, batch_size=60,
                      recipe_vars={"prune_start": 0, "prune_end": 0.5, "update_frequency": 0.5})
    run = train(cfg, data=None)
    model, ckpt = load_model(run)
    assert ckpt["arch"]["name"] == "resnet18" and ckpt["config"]["arch"] == "resnet18"
    assert abs(ckpt["sparsity"] - 0.5) <= 0.005 and len(ckpt["layer_sparsity"]) == 22  # 20 convs, fc weight and bias
    for part in ("classifier", "encoder"):
        record = export_run(run, part=part)
        assert record["parity"]["passed"] and record["parity"]["images"] == 80
        assert record["sparsity"] > 0.45
    assert record["output"]["shape"] == ["batch", 512]
