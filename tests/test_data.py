import tarfile

import pytest
import torch

from conftest import write_imagefolder
from whatislost.augment import make_augment
from whatislost.data import BatchLoader, load_imagefolder


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
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 1  # unpacked once
    load_imagefolder(str(archive))
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 1


@pytest.mark.parametrize("kind,channels", [("sup", 3), ("scl", 3), ("scl", 1)])
def test_batched_augmentation_keeps_shape_and_range(kind, channels):
    x = torch.rand(16, channels, 8, 8)
    y = make_augment(kind, 8, channels, crop_padding=2)(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_loader_length_is_steps_per_epoch(digits):
    loader = BatchLoader(digits.train_x, digits.train_y, digits.normalize_unit, 128, shuffle=True, drop_last=True,
                         augment=make_augment("scl", 8, 1), n_views=2)
    batches = list(loader)
    assert len(batches) == len(loader) == len(digits.train_x) // 128
    views, y = batches[0]
    assert len(views) == 2 and views[0].shape == (128, 1, 8, 8) and not torch.equal(views[0], views[1])
    evals = BatchLoader(digits.test_x, digits.test_y, digits.normalize_unit, 100)
    assert len(evals) == 5 and sum(len(y) for _, y in evals) == len(digits.test_x)


def test_cifar10_offline_error_names_the_folder(tmp_path):
    from whatislost.cli import UserError
    from whatislost.data import load_cifar10

    with pytest.raises(UserError, match=f"CIFAR-10 not found in '{tmp_path}'.*imagefolder"):
        load_cifar10(str(tmp_path))


# ---- caches, data identity and one-line errors of the imagefolder loader ----

import io  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402

import whatislost.data as data_mod  # noqa: E402
from whatislost.data import ImageData, data_fingerprint, load_data  # noqa: E402

UserError = data_mod.UserError  # wherever it lives (whatislost.cli today)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test here gets its own cache folder, never ~/.cache."""
    monkeypatch.setattr(data_mod, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def snapshot(root):
    """Bytes and modes of every file under root (a folder or one file): to show the user's data is untouched."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mode) for p in files}


def tensor_caches(cache):
    return sorted((cache / "tensors").glob("*.pt"))


def raises_one_line(func, *match):
    """func() raises UserError with a one-line message containing every string in match; returns the message."""
    with pytest.raises(UserError) as info:
        func()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    for part in match:
        assert str(part) in message, message
    return message


def test_deleting_an_image_changes_the_next_load_and_fingerprint(tiny_imagefolder, private_cache):
    root, _ = tiny_imagefolder
    first = load_imagefolder(str(root))
    assert len(tensor_caches(private_cache)) == 1
    (root / "train" / "dog" / "3.png").unlink()
    second = load_imagefolder(str(root))
    assert second.train_x.shape == (7, 3, 6, 6) and second.train_y.tolist() == [0] * 4 + [1] * 3
    assert torch.equal(second.train_x, first.train_x[:7])
    assert second.fingerprint != first.fingerprint
    assert len(tensor_caches(private_cache)) == 1  # rebuilt in place, not beside
    # rewriting an image in place (same size, new bytes) is noticed as well
    from torchvision.io import write_png
    write_png(torch.zeros(3, 6, 6, dtype=torch.uint8), str(root / "test" / "cat" / "0.png"))
    third = load_imagefolder(str(root))
    assert third.test_x[0].sum() == 0 and third.fingerprint != second.fingerprint


def test_cache_hit_gives_the_same_data_and_fingerprint(tiny_imagefolder, private_cache, monkeypatch):
    root, _ = tiny_imagefolder
    first = load_imagefolder(str(root))
    monkeypatch.setattr(data_mod, "_decode_folder", lambda *a: pytest.fail("decoded again despite a valid cache"))
    again = load_imagefolder(str(root))
    assert torch.equal(again.train_x, first.train_x) and again.fingerprint == first.fingerprint
    assert again.fingerprint == data_fingerprint(again.classes, again.train_x, again.train_y, again.test_x,
                                                 again.test_y)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "tampered"])
def test_damaged_cache_file_is_rebuilt(tiny_imagefolder, private_cache, damage):
    root, _ = tiny_imagefolder
    good = load_imagefolder(str(root))
    (cache,) = tensor_caches(private_cache)
    size = cache.stat().st_size
    if damage == "truncate":  # a crash mid-write of an older version, or a disk that filled up
        cache.write_bytes(cache.read_bytes()[: size // 2])
    elif damage == "garbage":
        cache.write_bytes(os.urandom(size))
    elif damage == "empty":
        cache.write_bytes(b"")
    else:  # a well-formed file whose pixels no longer match what was decoded
        blob = torch.load(cache, weights_only=True)
        blob["train_x"][0, 0, 0, 0] ^= 1
        torch.save(blob, cache)
    again = load_imagefolder(str(root))
    assert torch.equal(again.train_x, good.train_x) and again.fingerprint == good.fingerprint
    assert cache.stat().st_size == size  # written again, whole
    assert list((private_cache / "tensors").iterdir()) == [cache]  # no temp files left behind


def test_read_only_data_folder_loads_and_is_never_written(tiny_imagefolder, private_cache):
    root, _ = tiny_imagefolder
    stale = root / ".whatislost-tensors.pt"  # what older versions wrote into the data folder
    torch.save({k: torch.zeros(1, 3, 6, 6, dtype=torch.uint8) for k in ("train_x", "test_x")}
               | {k: torch.zeros(1, dtype=torch.long) for k in ("train_y", "test_y")}, stale)
    before = snapshot(root.parent)
    modes = {}
    for p in [root, *root.rglob("*")]:
        modes[p] = p.stat().st_mode
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        a = load_imagefolder(str(root))
        b = load_imagefolder(str(root))
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert a.train_x.shape == (8, 3, 6, 6) and torch.equal(a.train_x, b.train_x)  # the stale file was ignored
    assert snapshot(root.parent) == before  # nothing written, nothing deleted (the old cache file included)
    assert len(tensor_caches(private_cache)) == 1


def test_same_folder_name_different_content_different_fingerprint(tmp_path):
    one = write_imagefolder(tmp_path / "a" / "pics", ("cat", "dog"), n_train=2, n_test=1, size=6)
    two = write_imagefolder(tmp_path / "b" / "pics", ("cat", "dog"), n_train=2, n_test=1, size=6)
    assert load_imagefolder(str(one)).fingerprint == load_imagefolder(str(two)).fingerprint  # same seed, same pixels
    from torchvision.io import write_png
    write_png(torch.full((3, 6, 6), 7, dtype=torch.uint8), str(two / "test" / "dog" / "0.png"))  # one image differs
    a, b = load_imagefolder(str(one)), load_imagefolder(str(two))
    assert a.name == b.name == "pics" and a.test_x.shape == b.test_x.shape
    assert a.fingerprint != b.fingerprint
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    # class names are content too: the same pixels under other names are other data
    renamed = ImageData("pics", ["x", "y"], a.train_x, a.train_y, a.test_x, a.test_y)
    assert renamed.fingerprint != a.fingerprint


def test_folder_and_its_archive_give_one_fingerprint(tiny_imagefolder, tmp_path):
    root, archive = tiny_imagefolder
    a, b = load_imagefolder(str(root)), load_imagefolder(str(archive))
    assert a.fingerprint == b.fingerprint and a.name == b.name == "pics"
    moved = tmp_path / "elsewhere" / "copy.tar.gz"  # another name and place, same bytes: same unpack
    moved.parent.mkdir()
    moved.write_bytes(archive.read_bytes())
    assert load_imagefolder(str(moved)).fingerprint == a.fingerprint
    assert len(list((tmp_path / "cache" / "archives").iterdir())) == 2  # named by the archive: copy-<same key>
    # an archive without a top folder is named after the archive, not after the cache folder
    flat = tmp_path / "flat.tar"
    with tarfile.open(flat, "w") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    c = load_imagefolder(str(flat))
    assert c.name == "flat" and c.fingerprint == a.fingerprint


def test_digits_fingerprint_is_stable(digits):
    from whatislost.data import load_digits
    assert digits.fingerprint == load_digits().fingerprint != ""
    assert digits.fingerprint == data_fingerprint(digits.classes, digits.train_x, digits.train_y, digits.test_x,
                                                  digits.test_y)


def test_changed_archive_is_unpacked_again(tiny_imagefolder, tmp_path):
    root, archive = tiny_imagefolder
    first = load_imagefolder(str(archive))
    (root / "train" / "cat" / "0.png").unlink()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pics")
    second = load_imagefolder(str(archive))
    assert len(second.train_x) == len(first.train_x) - 1 and second.fingerprint != first.fingerprint


def test_killed_unpack_is_never_taken_as_complete(tiny_imagefolder, private_cache):
    root, archive = tiny_imagefolder
    good = load_imagefolder(str(root))
    key = data_mod._file_sha256(archive)[:16]
    archives = private_cache / "archives"
    # a crash of this version: only a .tmp-* folder, its owner dead (pid far above pid_max)
    dead = archives / ".tmp-pics-killed"
    (dead / "pics" / "train" / "cat").mkdir(parents=True)
    (dead / data_mod.OWNER_MARK).write_text(f"{data_mod.socket.gethostname()} 999999999\n")
    # an unpack in progress in a live process: left alone
    live = archives / ".tmp-pics-running"
    live.mkdir()
    (live / data_mod.OWNER_MARK).write_text(f"{data_mod.socket.gethostname()} {os.getpid()}\n")
    # a half-written folder under the final name (as older versions could leave): no mark, so not complete
    half = archives / f"pics-{key}"
    (half / "pics" / "train" / "cat").mkdir(parents=True)
    (half / "pics" / "test" / "cat").mkdir(parents=True)
    (half / "pics" / "train" / "cat" / "0.png").write_bytes(b"half")
    data = load_imagefolder(str(archive))
    assert torch.equal(data.train_x, good.train_x) and data.fingerprint == good.fingerprint
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in archives.iterdir()) == [".tmp-pics-running", f"pics-{key}"]
    # a complete unpack whose files changed afterwards (deleted by hand) is unpacked again too
    (half / "pics" / "train" / "dog" / "1.png").unlink()
    assert torch.equal(load_imagefolder(str(archive)).train_x, good.train_x)


# -- one-line errors naming the culprit; the user's files untouched --

def corrupt_png(path):
    """Flip a byte inside the IDAT chunk: libpng's CRC check fails (torchvision's decoder would crash on it)."""
    raw = bytearray(path.read_bytes())
    i = raw.index(b"IDAT") + 6
    raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_png_names_the_file(tiny_imagefolder):
    root, _ = tiny_imagefolder
    bad = root / "train" / "dog" / "2.png"
    corrupt_png(bad)
    before = snapshot(root)
    raises_one_line(lambda: load_imagefolder(str(root)), "cannot decode image", bad)
    assert snapshot(root) == before


@pytest.mark.parametrize("content", ["truncated-jpeg", "text", "empty"])
def test_undecodable_image_names_the_file(tiny_imagefolder, content):
    from torchvision.io import encode_jpeg

    root, _ = tiny_imagefolder
    bad = root / "test" / "cat" / "1.png"
    if content == "truncated-jpeg":
        bad = bad.with_suffix(".jpg")
        jpeg = encode_jpeg(torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8)).numpy().tobytes()
        bad.write_bytes(jpeg[: len(jpeg) // 2])
    else:
        bad = bad.with_name("notes.txt")
        bad.write_bytes(b"taken on a cloudy day\n" if content == "text" else b"")
    before = snapshot(root)
    raises_one_line(lambda: load_imagefolder(str(root)), bad)
    assert snapshot(root) == before


def test_hidden_files_are_skipped(tiny_imagefolder):
    root, _ = tiny_imagefolder
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    data = load_imagefolder(str(root))
    assert data.classes == ["cat", "dog"] and len(data.train_x) == 8


def test_class_missing_from_test_names_it(tiny_imagefolder):
    root, _ = tiny_imagefolder
    (root / "test" / "dog").rename(root.parent / "dog-test-aside")
    before = snapshot(root.parent)
    raises_one_line(lambda: load_imagefolder(str(root)), "'dog'", root / "train", "not in", root / "test")
    assert snapshot(root.parent) == before


def test_class_only_in_test_names_it(tiny_imagefolder):
    root, _ = tiny_imagefolder
    (root / "test" / "cow").mkdir()
    (root / "test" / "cat" / "0.png").rename(root / "test" / "cow" / "0.png")
    before = snapshot(root)
    raises_one_line(lambda: load_imagefolder(str(root)), "'cow'", root / "test", "not in", root / "train")
    assert snapshot(root) == before


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_names_it(tiny_imagefolder, split):
    root, _ = tiny_imagefolder
    (root / split / "emu").mkdir()
    (root / ("test" if split == "train" else "train") / "emu").mkdir()
    if split == "test":  # only the test folder is empty
        (root / "train" / "cat" / "0.png").rename(root / "train" / "emu" / "0.png")
    before = snapshot(root)
    raises_one_line(lambda: load_imagefolder(str(root)), root / split / "emu", "no images")
    assert snapshot(root) == before


def test_images_of_differing_sizes_name_both_files(tiny_imagefolder):
    from torchvision.io import write_png

    root, _ = tiny_imagefolder
    odd = root / "test" / "dog" / "1.png"  # train images are all 6x6: a test image must be too
    write_png(torch.zeros(3, 8, 6, dtype=torch.uint8), str(odd))
    before = snapshot(root)
    raises_one_line(lambda: load_imagefolder(str(root)), "differ in size", odd, "6x8", "6x6")
    assert snapshot(root) == before


def unsafe_members():
    outside = tarfile.TarInfo("pics/../../evil.png")
    absolute = tarfile.TarInfo("/tmp/whatislost-evil.png")
    link = tarfile.TarInfo("pics/train/cat/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "../../../../../etc/passwd"
    return {"dotdot": (outside, b"x"), "absolute": (absolute, b"x"), "link": (link, None)}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_unsafe_archive_member_is_refused_by_name(tiny_imagefolder, tmp_path, private_cache, kind):
    root, _ = tiny_imagefolder
    info, payload = unsafe_members()[kind]
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pics")
        if payload is not None:
            info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    before = snapshot(archive)
    raises_one_line(lambda: load_imagefolder(str(archive)), "unsafe member", f"'{info.name}'", archive)
    assert snapshot(archive) == before
    assert not (private_cache / "evil.png").exists() and not (tmp_path / "evil.png").exists()
    assert not os.path.exists("/tmp/whatislost-evil.png")
    assert list((private_cache / "archives").iterdir()) == []  # nothing half-unpacked left behind


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_file_that_is_not_an_archive_names_it(tiny_imagefolder, tmp_path, private_cache, kind):
    _, good = tiny_imagefolder
    bad = tmp_path / f"{kind}.tar.gz"
    raw = good.read_bytes()
    bad.write_bytes({"text": b"these are my notes\n", "truncated": raw[: len(raw) // 2], "empty": b""}[kind])
    before = snapshot(bad)
    raises_one_line(lambda: load_data("imagefolder", str(bad)), "cannot unpack", bad, "not a valid")
    assert snapshot(bad) == before
    assert list((private_cache / "archives").iterdir()) == []


def test_user_errors_are_one_line_and_exit_2(tiny_imagefolder, capsys):
    from whatislost.cli import run_cli

    root, _ = tiny_imagefolder
    corrupt_png(root / "train" / "cat" / "1.png")
    assert run_cli(lambda argv: load_data("imagefolder", str(root)), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "1.png" in err


def test_normalize_is_the_one_preprocessing(digits):
    x = digits.test_x[:5]
    expect = (x.float() / 255 - digits.mean.view(1, -1, 1, 1)) / digits.std.view(1, -1, 1, 1)
    got = digits.normalize(x)
    assert got.dtype == torch.float32 and got.device == x.device and torch.allclose(got, expect, atol=1e-6)
    assert torch.equal(digits.normalize(x[0]), got[0])  # one image (C, H, W) too
    assert torch.equal(digits.normalize_unit(x.float() / 255), got)
    loader = BatchLoader(x, digits.test_y[:5], digits.normalize_unit, 5)
    (views, _), = list(loader)
    assert torch.equal(views[0], got)
    with pytest.raises(TypeError):
        digits.normalize(x.float())
    pre = digits.preprocessing
    assert pre["formula"] == data_mod.PREPROCESSING and len(pre["mean"]) == len(pre["std"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_normalize_on_gpu(digits):
    x = digits.test_x[:5]
    assert torch.allclose(digits.normalize(x.cuda()).cpu(), digits.normalize(x), atol=1e-6)


def test_unwritable_cache_still_loads_folders(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    root, archive = tiny_imagefolder
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(data_mod, "CACHE_DIR", blocker / "cache")  # mkdir fails, even for root
    assert load_imagefolder(str(root)).train_x.shape == (8, 3, 6, 6)  # decoded, just not cached
    assert "not cached" in capsys.readouterr().err
    raises_one_line(lambda: load_imagefolder(str(archive)), "cannot unpack", archive, "WHATISLOST_CACHE_DIR")


def test_unpack_finished_first_by_another_process_is_used(tiny_imagefolder, private_cache, monkeypatch):
    root, archive = tiny_imagefolder
    good = load_imagefolder(str(archive))
    (theirs,) = (private_cache / "archives").iterdir()
    inode = theirs.stat().st_ino
    real, calls = data_mod._unpacked_ok, []

    def first_look_misses(dest):  # our first look finds nothing; by our rename, another process has finished
        calls.append(dest)
        return len(calls) > 1 and real(dest)

    monkeypatch.setattr(data_mod, "_unpacked_ok", first_look_misses)
    again = load_imagefolder(str(archive))
    assert again.fingerprint == good.fingerprint
    assert list((private_cache / "archives").iterdir()) == [theirs] and theirs.stat().st_ino == inode  # theirs kept
    assert len(calls) == 2  # and ours, unpacked meanwhile, dropped



def test_per_class_subsets_are_fixed_stratified_and_identified_by_content(digits):
    from whatislost.data import load_data

    small = load_data("digits", train_per_class=10, test_per_class=3)
    assert torch.bincount(small.train_y).tolist() == [10] * 10 and torch.bincount(small.test_y).tolist() == [3] * 10
    assert small.fingerprint == load_data("digits", train_per_class=10, test_per_class=3).fingerprint
    assert small.fingerprint != digits.fingerprint
    first_zero = (digits.train_y == 0).nonzero().flatten()[0]
    assert torch.equal(small.train_x[(small.train_y == 0).nonzero().flatten()[0]], digits.train_x[first_zero])


def test_subset_run_is_scored_on_the_same_subset(tmp_path):
    from conftest import tiny_config
    from whatislost.eval import run_eval
    from whatislost.train import train

    for seed in (0, 1):
        train(tiny_config(tmp_path / "runs" / f"s{seed}", recipe="recipes/dense.yaml", epochs=1, train_per_class=20,
                          test_per_class=5, seed=seed))
    out = run_eval(tmp_path / "runs", tmp_path / "eval", metrics=("acc",), report=False)
    import json

    (row,) = json.loads((out / "summary.json").read_text())["populations"]
    assert row["n_models"] == 2
    samples = __import__("pandas").read_csv(out / "tables" / "per_sample_digits-wrn10-1.csv")
    assert len(samples) == 50
