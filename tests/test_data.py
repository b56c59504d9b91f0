import tarfile

import pytest
import torch

from conftest import write_imagefolder
from whatislost.data import BatchLoader, load_imagefolder, make_augment


def test_digits_split_is_fixed_and_stratified(digits):
    assert digits.train_x.dtype == torch.uint8 and digits.train_x.shape[1:] == (1, 8, 8)
    assert len(digits.train_x) + len(digits.test_x) == 1797
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # 25% of each class
    from whatislost.data import load_digits
    assert torch.equal(load_digits().test_y, digits.test_y)


@pytest.fixture
def tiny_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "tiny" / "pics", ("cat", "dog"), n_train=4, n_test=2, size=6)
    archive = tmp_path / "pics.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pics")
    return root, archive


def test_imagefolder_from_folder_and_archive(tiny_imagefolder, tmp_path, monkeypatch):
    import whatislost.data as data

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    root, archive = tiny_imagefolder
    a = load_imagefolder(str(root))
    b = load_imagefolder(str(archive))
    assert a.classes == b.classes == ["cat", "dog"]
    assert a.train_x.shape == (8, 3, 6, 6) and a.test_x.shape == (4, 3, 6, 6)
    assert torch.equal(a.train_x, b.train_x) and a.train_y.tolist() == [0] * 4 + [1] * 4
    assert len(list((tmp_path / "cache").iterdir())) == 1  # unpacked once
    load_imagefolder(str(archive))
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("kind,channels", [("sup", 3), ("scl", 3), ("scl", 1)])
def test_batched_augmentation_keeps_shape_and_range(kind, channels):
    x = torch.rand(16, channels, 8, 8)
    y = make_augment(kind, 8, channels, crop_padding=2)(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_loader_length_is_steps_per_epoch(digits):
    loader = BatchLoader(digits.train_x, digits.train_y, digits.mean, digits.std, 128, shuffle=True, drop_last=True,
                         augment=make_augment("scl", 8, 1), n_views=2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(digits.train_x) // 128
    views, y = batches[0]
    assert len(views) == 2 and views[0].shape == (128, 1, 8, 8) and not torch.equal(views[0], views[1])
    evals = BatchLoader(digits.test_x, digits.test_y, digits.mean, digits.std, 100)
    assert len(evals) == 5 and sum(len(y) for _, y in evals) == len(digits.test_x)


def test_cifar10_offline_error_names_the_folder(tmp_path):
    from whatislost.config import UserError
    from whatislost.data import load_cifar10

    with pytest.raises(UserError, match=f"CIFAR-10 not found in '{tmp_path}'.*imagefolder"):
        load_cifar10(str(tmp_path))
