"""Data stage: image sets held as uint8 tensors, augmented in batches on the training device.

Per-image PIL transforms in DataLoader workers are where CPU time goes on 32x32
images, so images stay as one (N, C, H, W) uint8 tensor on the training device and
each batch is augmented at once (whatislost.augment: per-sample random parameters,
a few batched tensor ops, no host synchronisation).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch

from .cli import UserError, first_line

# Everything derived from the user's data lives here, never in the data folder itself:
#   archives/<stem>-<sha256 of the archive>/   an unpacked .tar.gz; complete only once renamed into place
#                                              from archives/.tmp-*/ (a killed unpack leaves only a .tmp-*)
#   tensors/<folder name>-<hash of its path>.pt  decoded images of one folder, valid only while the folder's
#                                              signature (paths, sizes, mtimes of its images) still matches
# Old `.whatislost-tensors.pt` files that earlier versions wrote into data folders are ignored, never deleted.
CACHE_DIR = Path(os.environ.get("WHATISLOST_CACHE_DIR") or Path.home() / ".cache" / "whatislost")
CACHE_FORMAT = 2  # bump when decoding or the layout of tensors/*.pt changes: old caches are then rebuilt
UNPACKED_MARK = ".whatislost-unpacked.json"  # written last into an unpacked archive: its file list, to verify
OWNER_MARK = ".whatislost-owner"  # host and pid of the process unpacking into an archives/.tmp-* folder
STALE_TEMP_S = 2 * 24 * 3600  # a temp file or folder of ours this old is a leftover of a crash, whoever made it
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the one place the input preprocessing is written down (ImageData.normalize implements it)
PREPROCESSING = "(uint8 / 255 - mean) / std per channel; mean, std of the train images / 255"


@dataclass
class ImageData:
    """A labelled image set. x: (N, C, H, W) uint8; y: (N,) int64; mean/std: (C,) of train x / 255."""

    name: str
    classes: list
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def __post_init__(self):
        pixels = self.train_x.float().div_(255).transpose(0, 1).reshape(self.train_x.shape[1], -1)
        self.mean = pixels.mean(1)
        self.std = pixels.std(1).clamp_min(1e-3)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @cached_property
    def fingerprint(self) -> str:
        """16 hex digits of SHA-256 over the class names and the dtype, shape and bytes of train/test x and y.

        Content only: not the name, the folder or whether it came from an archive. Computed once (about 0.1 s
        for CIFAR-10's 184 MB); the tensors are treated as read-only from then on.
        """
        return data_fingerprint(self.classes, self.train_x, self.train_y, self.test_x, self.test_y)

    @property
    def preprocessing(self) -> dict:
        """What `normalize` does, with this data's numbers (for run records and exported models)."""
        return {"formula": PREPROCESSING, "mean": self.mean.tolist(), "std": self.std.tolist()}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) or (C, H, W) on any device -> float32 (x / 255 - mean) / std on that device."""
        if x.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {x.dtype}; use normalize_unit for floats in [0, 1]")
        return self.normalize_unit(x.float().div_(255))

    def normalize_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Float images already in [0, 1] (e.g. after augmentation) -> float32 (x - mean) / std on x's device."""
        mean, std = self._stats_on(x.device)
        return (x.float() - mean) / std

    def _stats_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        # copied to each device once: a host-to-GPU copy per batch would wait for the GPU on every step
        cache = self.__dict__.setdefault("_device_stats", {})
        if device not in cache:
            cache[device] = (self.mean.to(device).view(-1, 1, 1), self.std.to(device).view(-1, 1, 1))
        return cache[device]


def data_fingerprint(classes, *tensors: torch.Tensor) -> str:
    """The content hash behind `ImageData.fingerprint`."""
    h = hashlib.sha256(b"whatislost-data-v1\0")
    h.update(json.dumps([str(c) for c in classes]).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"\0{str(t.dtype)}{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def load_digits() -> ImageData:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), fixed stratified 75/25 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    # pixel values are 0..16; stretch to the 0..255 of every other data set
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    idx_train, idx_test = train_test_split(
        np.arange(len(images)), test_size=0.25, stratify=bunch.target, random_state=0
    )
    x, y = torch.from_numpy(images), torch.from_numpy(bunch.target).long()
    return ImageData("digits", [str(c) for c in range(10)], x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def load_cifar10(root: str) -> ImageData:
    """torchvision's CIFAR10 format under `root`; downloaded only when the machine is online."""
    from torchvision.datasets import CIFAR10

    sets = {}
    for train in (True, False):
        try:
            ds = CIFAR10(root, train=train, download=False)
        except RuntimeError:
            old = socket.getdefaulttimeout()
            socket.setdefaulttimeout(15)  # offline machines should fail fast, not hang
            try:
                ds = CIFAR10(root, train=train, download=True)
            except Exception:
                raise UserError(
                    f"CIFAR-10 not found in '{root}' and could not be downloaded (offline?): put torchvision's "
                    f"cifar-10-batches-py there, or use dataset=imagefolder with data_root=PATH/cifar10-jpeg.tar.gz"
                ) from None
            finally:
                socket.setdefaulttimeout(old)
        sets[train] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))
    return ImageData("cifar10", list(ds.classes), *sets[True], *sets[False])


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tree_hash(root: Path) -> str:
    """SHA-256 of (relative path, size, mtime_ns) of every file and link under root, our marks left out."""
    entries, todo = [], [("", str(root))]
    while todo:
        prefix, folder = todo.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    todo.append((rel + "/", entry.path))
                elif rel not in (UNPACKED_MARK, OWNER_MARK):
                    st = entry.stat(follow_symlinks=False)
                    entries.append(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}")
    entries.sort()
    return hashlib.sha256("\n".join(entries).encode(errors="surrogateescape")).hexdigest()


def _unpacked_ok(dest: Path) -> bool:
    """Whether `dest` is a complete unpack: its mark (written last) lists exactly the files there now."""
    try:
        mark = json.loads((dest / UNPACKED_MARK).read_text())
        return isinstance(mark, dict) and mark.get("tree") == _tree_hash(dest)
    except (OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


def _remove_leftovers(folder: Path) -> None:
    """Delete .tmp-*/.trash-* entries of ours in `folder` whose writer is gone (a dead pid on this host, or old)."""
    host, now = socket.gethostname(), time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith((".tmp-", ".trash-")):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            gone = entry.name.startswith(".trash-")
            if is_dir and not gone and (Path(entry.path) / OWNER_MARK).exists():
                owner_host, pid = (Path(entry.path) / OWNER_MARK).read_text().split()
                gone = owner_host == host and not _pid_alive(int(pid))
            if gone or now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_S:
                shutil.rmtree(entry.path) if is_dir else os.unlink(entry.path)
        except (OSError, ValueError):
            pass  # another process is cleaning up too, or the owner mark is half written


def _safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (no '..', no links out, no devices), and absolute names refused, not stripped."""
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished unpack to its final name; a broken folder of ours under that name is set aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, dest)
            return
        except OSError:
            if not dest.exists():
                raise
        if _unpacked_ok(dest):
            return  # another process finished the same archive first
        trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=dest.parent))
        try:
            os.rename(dest, trash / "old")
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp, dest)


def _unpack_once(archive: Path) -> Path:
    """Unpack a .tar(.gz) into CACHE_DIR/archives once per archive content (SHA-256); return the folder.

    The unpack goes to a .tmp-* folder that is renamed into place when complete, so a killed unpack never
    counts; leftovers of dead unpacks are removed. The folder is checked against its file list on every use.
    """
    try:
        digest = _file_sha256(archive)
    except OSError as err:
        raise UserError(f"cannot read archive {archive}: {first_line(err)}") from None
    stem = archive.name.split(".")[0] or "data"
    root = CACHE_DIR / "archives"
    dest = root / f"{stem}-{digest[:16]}"
    if _unpacked_ok(dest):
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{stem}-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from others
    except OSError as err:
        raise UserError(f"cannot unpack {archive}: cache folder {root} is not writable ({first_line(err)}); "
                        f"set WHATISLOST_CACHE_DIR to a writable folder") from None
    try:
        (tmp / OWNER_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter=_safe_member)
        (tmp / UNPACKED_MARK).write_text(json.dumps({"archive": str(archive.resolve()), "sha256": digest,
                                                     "tree": _tree_hash(tmp)}))
        _move_into_place(tmp, dest)
    except tarfile.FilterError as err:
        raise UserError(f"refusing to unpack {archive}: unsafe member '{err.tarinfo.name}' "
                        f"({first_line(err)})") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as err:
        detail = first_line(err).rstrip(":")
        if isinstance(err, tarfile.ReadError) and "could not be opened" in detail:
            detail = "neither tar nor gzip, bzip2 or xz compressed tar"
        raise UserError(f"cannot unpack {archive}: not a valid .tar/.tar.gz archive, or it is cut short "
                        f"({detail})") from None
    except OSError as err:
        raise UserError(f"cannot unpack {archive} into {root}: {first_line(err)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place
    try:
        (dest / OWNER_MARK).unlink()
    except OSError:
        pass
    return dest


def _subfolders(folder: Path) -> list:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _find_split_root(folder: Path, shown=None) -> Path:
    """The folder holding train/ and test/: `folder`, else the only one one or two levels down (archives add a
    top folder). Hidden folders are skipped; several candidates at one level are an error, not a guess."""
    def holds_splits(p: Path) -> bool:
        return (p / "train").is_dir() and (p / "test").is_dir()

    if holds_splits(folder):
        return folder
    level = [folder]
    for _ in range(2):
        level = [sub for p in level for sub in _subfolders(p)]
        found = [p for p in level if holds_splits(p)]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(str(p.relative_to(folder)) for p in found[:3])
            raise UserError(f"imagefolder data '{shown or folder}' holds several train/ and test/ folders "
                            f"({names}); point data_root at one of them")
    raise UserError(f"imagefolder data '{shown or folder}' has no train/ and test/ folders of <class>/ images")


def _visible_entries(folder: Path) -> list:
    """os.DirEntry of `folder` not starting with '.' (.DS_Store, .ipynb_checkpoints, ._* files), by name."""
    try:
        return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot read folder {folder}: {first_line(err)}") from None


@lru_cache(maxsize=1)
def _decoder_versions() -> list:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torchvision", "pillow"):
        try:
            found.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            found.append(f"{package}==?")
    return found


def _list_images(split_root: Path) -> tuple[list, dict, str]:
    """Check the class folders and list the images: (classes, {split: [(path, label)]}, signature).

    Classes are train/'s folders in alphabetical order (the label order); test/ must hold the same ones, each
    with at least one image. The signature covers every image's relative path, size, mtime and ctime (and the
    decoders' versions): adding, removing or rewriting an image changes it.
    """
    train_dir, test_dir = split_root / "train", split_root / "test"
    folders = {d: [e.name for e in _visible_entries(d) if e.is_dir()] for d in (train_dir, test_dir)}
    classes = folders[train_dir]
    if not classes:
        raise UserError(f"no class folders in {train_dir}")
    for have, lack, why in ((train_dir, test_dir, "every class needs test images"),
                            (test_dir, train_dir, "a class without training images cannot be learned")):
        odd = [c for c in folders[have] if c not in folders[lack]]
        if odd:
            more = f" (and {len(odd) - 1} more)" if len(odd) > 1 else ""
            raise UserError(f"class folder '{odd[0]}'{more} is in {have} but not in {lack}; {why}")
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, _decoder_versions(), classes]).encode())
    files = {}
    for split in ("train", "test"):
        files[split] = []
        for label, cls in enumerate(classes):
            folder = split_root / split / cls
            images = [e for e in _visible_entries(folder) if e.is_file()]
            if not images:
                raise UserError(f"class folder {folder} has no images")
            for entry in images:
                st = entry.stat()
                h.update(f"{split}/{cls}/{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                         .encode(errors="surrogateescape"))
                files[split].append((entry.path, label))
    return classes, files, h.hexdigest()


def _decoder_message(err: BaseException) -> str:
    """A decoder's error as one short line, without torchvision's C++ source location."""
    return re.sub(r"^.*?\.cpp:\d+, ", "", first_line(err))


def _decode_image(path: Path) -> torch.Tensor:
    """One image file -> (3, H, W) uint8. PNGs go through Pillow (torchvision's libpng crashes the process on
    some damaged PNGs; lossless, so the pixels are the same), everything else through torchvision."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        data = path.read_bytes()
        if not data:
            raise UserError(f"image {path} is an empty file")
        if data.startswith(PNG_MAGIC):
            if len(data) > 24 and data[24] == 16:
                raise UserError(f"image {path} is a 16-bit PNG; convert it to 8 bits per channel")
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                rgb = np.array(im.convert("RGB"))
            return torch.from_numpy(rgb).permute(2, 0, 1)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except UserError:
        raise
    except Exception as err:  # RuntimeError from torchvision, OSError/SyntaxError/ValueError from Pillow
        raise UserError(f"cannot decode image {path}: {_decoder_message(err)}") from None


def _decode_folder(items: list, first=None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """[(path, label)] -> ((N, 3, H, W) uint8, (N,) int64, (path, shape) of the first image).

    Every image must have the shape of `first` (a (path, shape) from another split), else of the first one here.
    """
    images, labels = [], []
    for path, label in items:
        path = Path(path)
        image = _decode_image(path)
        if image.dtype != torch.uint8:
            raise UserError(f"image {path} is not 8 bits per channel ({image.dtype}); convert it")
        if first is None:
            first = (path, tuple(image.shape))
        elif tuple(image.shape) != first[1]:
            (_, h, w), (_, h0, w0) = image.shape, first[1]
            raise UserError(f"images differ in size: {path} is {w}x{h} but {first[0]} is {w0}x{h0}; "
                            f"resize them to one size first")
        images.append(image)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), first


def _read_tensor_cache(path: Path, signature: str, classes: list):
    """The cached blob if complete, intact and still describing the folder; None (rebuild) otherwise."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(blob, dict) and blob.get("format") == CACHE_FORMAT and blob.get("signature") == signature
                and blob.get("classes") == classes):
            return None
        tensors = [blob[k] for k in ("train_x", "train_y", "test_x", "test_y")]
        if all(isinstance(t, torch.Tensor) for t in tensors) and blob.get("fingerprint") == data_fingerprint(
                classes, *tensors):
            return blob
    except Exception:  # cut short by a crash, damaged on disk, written by another version: decode again
        pass
    return None


def _write_tensor_cache(path: Path, blob: dict) -> None:
    """Write to a temp file in the same folder, fsync, os.replace: readers see the old file or the new one."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared cache (WHATISLOST_CACHE_DIR) from others
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as err:
        print(f"whatislost: warning: decoded images not cached in {path.parent} ({first_line(err)}); "
              f"they are decoded again next time", file=sys.stderr)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_imagefolder(root: str) -> ImageData:
    """root/train/<class>/*, root/test/<class>/* (or a .tar/.tar.gz of that); decoded once, cached by content.

    Labels follow the alphabetical order of train/'s class folders. Decoded tensors are cached under
    CACHE_DIR/tensors, keyed by the folder's path and checked against its signature on every load (adding,
    removing or rewriting an image rebuilds them; a cut-short or damaged cache file is rebuilt too). Nothing
    is ever written into the data folder.
    """
    path = Path(root)
    if not path.exists():
        raise UserError(f"data_root '{root}' does not exist")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise UserError(f"data_root '{root}' is a file but not a .tar.gz archive")
        folder = _unpack_once(path)
        split_root = _find_split_root(folder, shown=root)
        name = split_root.name if split_root != folder else folder.name.rsplit("-", 1)[0]
    else:
        split_root = _find_split_root(path)
        name = Path(os.path.abspath(split_root)).name
    classes, files, signature = _list_images(split_root)
    where = hashlib.sha256(str(split_root.resolve()).encode(errors="surrogateescape")).hexdigest()[:12]
    cache = CACHE_DIR / "tensors" / f"{name}-{where}.pt"
    blob = _read_tensor_cache(cache, signature, classes)
    if blob is None:
        train_x, train_y, first = _decode_folder(files["train"])
        test_x, test_y, _ = _decode_folder(files["test"], first)
        fingerprint = data_fingerprint(classes, train_x, train_y, test_x, test_y)
        blob = dict(format=CACHE_FORMAT, signature=signature, classes=classes, fingerprint=fingerprint,
                    train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
        _write_tensor_cache(cache, blob)
    data = ImageData(name, classes, blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"])
    data.__dict__["fingerprint"] = blob["fingerprint"]  # just computed or verified: no need to hash again
    return data


def load_data(dataset: str, data_root: str = "", train_per_class: int = 0, test_per_class: int = 0) -> ImageData:
    """A data set by name; with train_per_class / test_per_class > 0 only the first that many images of
    each class (a fixed, stratified subset: its content, and so its fingerprint, is the same every time)."""
    if dataset == "digits":
        data = load_digits()
    elif dataset == "cifar10":
        data = load_cifar10(data_root)
    elif dataset == "imagefolder":
        data = load_imagefolder(data_root)
    else:
        raise UserError(f"unknown dataset '{dataset}'")
    if not train_per_class and not test_per_class:
        return data
    train = first_per_class(data.train_y, train_per_class, data.num_classes)
    test = first_per_class(data.test_y, test_per_class, data.num_classes)
    return ImageData(data.name, data.classes, data.train_x[train], data.train_y[train], data.test_x[test],
                     data.test_y[test])


def first_per_class(y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """Indices (sorted) of the first n samples of every class in y (N,); all of them when n is 0."""
    if not n:
        return torch.arange(len(y))
    rank = torch.zeros_like(y)
    for c in range(num_classes):  # position of each sample within its class
        where = (y == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    return (rank < n).nonzero().flatten()


def load_run_data(cfg) -> ImageData:
    """The data a run (a TrainConfig or its saved dict) trains and is scored on."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default=None: getattr(cfg, key, default)
    return load_data(get("dataset"), get("data_root", "") or "", int(get("train_per_class", 0) or 0),
                     int(get("test_per_class", 0) or 0))


class BatchLoader:
    """Batches of normalised (and optionally augmented) images from uint8 tensors on `device`.

    Yields (views, y): views is a list of `n_views` float tensors (B, C, H, W), y is (B,).
    len() is the number of optimizer steps per epoch, which SparseML needs exactly.
    normalize: float images in [0, 1] -> normalised, the data set's own `ImageData.normalize_unit`.
    """

    def __init__(self, x, y, normalize, batch_size, device="cpu", shuffle=False, drop_last=False,
                 augment=None, n_views=1, channels_last=False, seed=0):
        self.x, self.y = x.to(device), y.to(device)
        self.normalize = normalize
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.drop_last = drop_last and len(x) >= batch_size
        self.augment, self.n_views = augment, n_views
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = self.x[idx].float().div_(255)
            views = [self.augment(images) if self.augment is not None else images for _ in range(self.n_views)]
            views = [self.normalize(v).contiguous(memory_format=self.memory_format) for v in views]
            yield views, self.y[idx]


class FeatureLoader:
    """Batches of precomputed features (N, D) and labels (N,), shuffled by its own generator."""

    def __init__(self, h: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.h, self.y, self.batch_size = h, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return max(len(self.h) // self.batch_size, 1)

    def __iter__(self):
        order = torch.randperm(len(self.h), generator=self.generator).to(self.h.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size] if b < len(self) - 1 else order[b * self.batch_size:]
            yield [self.h[idx]], self.y[idx]
