"""Data stage: image sets held as uint8 tensors, augmented in batches on the training device.

Per-image PIL transforms in DataLoader workers are where CPU time goes on 32x32
images, so images stay as one (N, C, H, W) uint8 tensor and each batch is
augmented at once with kornia (per-sample random parameters, on CPU or GPU).
"""
from __future__ import annotations

import hashlib
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import UserError

CACHE_DIR = Path.home() / ".cache" / "whatislost"


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


def _unpack_once(archive: Path) -> Path:
    """Unpack a .tar.gz into the cache (once, keyed by name, size and mtime); return the folder."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    dest = CACHE_DIR / f"{archive.name.split('.')[0]}-{key}"
    if not (dest / ".unpacked").exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        (dest / ".unpacked").touch()
    return dest


def _find_split_root(folder: Path) -> Path:
    """The folder holding train/ and test/, at most two levels down (archives add a top folder)."""
    for cand in [folder, *folder.glob("*"), *folder.glob("*/*")]:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return cand
    raise UserError(f"imagefolder data '{folder}' has no train/ and test/ folders of <class>/ images")


def _decode_folder(split_dir: Path, classes: list) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_image, read_file

    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).iterdir() if p.is_file())
        for path in files:
            images.append(decode_image(read_file(str(path)), mode=ImageReadMode.RGB))
            labels.append(label)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise UserError(f"images under {split_dir} differ in size ({sorted(shapes)[:3]} ...); resize them first")
    return torch.stack(images), torch.tensor(labels)


def load_imagefolder(root: str) -> ImageData:
    """root/train/<class>/*, root/test/<class>/* (or a .tar.gz of that); decoded once, cached as tensors."""
    path = Path(root)
    if not path.exists():
        raise UserError(f"data_root '{root}' does not exist")
    if path.is_file():
        if not path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise UserError(f"data_root '{root}' is a file but not a .tar.gz archive")
        path = _unpack_once(path)
    split_root = _find_split_root(path)
    classes = sorted(p.name for p in (split_root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"no class folders in {split_root / 'train'}")
    cache = split_root / ".whatislost-tensors.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
    else:
        blob = {}
        for split in ("train", "test"):
            blob[split + "_x"], blob[split + "_y"] = _decode_folder(split_root / split, classes)
        try:
            torch.save(blob, cache)
        except OSError:
            pass  # read-only data folder: decode again next time
    return ImageData(split_root.name, classes, blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"])


def load_data(dataset: str, data_root: str = "") -> ImageData:
    if dataset == "digits":
        return load_digits()
    if dataset == "cifar10":
        return load_cifar10(data_root)
    if dataset == "imagefolder":
        return load_imagefolder(data_root)
    raise UserError(f"unknown dataset '{dataset}'")


def make_augment(kind: str, image_size: int, channels: int = 3, crop_padding: int = 4, hflip: bool = True):
    """Batched augmentation of float images (B, C, H, W) in [0, 1], as in the paper.

    sup: random crop with zero padding + horizontal flip.
    scl: RandomResizedCrop(scale 0.2..1) + flip + ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 + grayscale
         with p=0.2 (the SimCLR views of Khosla et al. 2020); colour ops need 3 channels.
    none: identity.
    """
    import kornia.augmentation as K

    flip = [K.RandomHorizontalFlip()] if hflip else []
    if kind == "sup":
        return torch.nn.Sequential(K.RandomCrop((image_size, image_size), padding=crop_padding), *flip)
    if kind == "scl":
        colour = [K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2)] if channels == 3 else []
        return torch.nn.Sequential(K.RandomResizedCrop((image_size, image_size), scale=(0.2, 1.0)), *flip, *colour)
    if kind == "none":
        return None
    raise ValueError(f"unknown augmentation '{kind}'")


class BatchLoader:
    """Batches of normalised (and optionally augmented) images from uint8 tensors on `device`.

    Yields (views, y): views is a list of `n_views` float tensors (B, C, H, W), y is (B,).
    len() is the number of optimizer steps per epoch, which SparseML needs exactly.
    """

    def __init__(self, x, y, mean, std, batch_size, device="cpu", shuffle=False, drop_last=False,
                 augment=None, n_views=1, channels_last=False, seed=0):
        self.x, self.y = x.to(device), y.to(device)
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
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
            views = [((v - self.mean) / self.std).contiguous(memory_format=self.memory_format) for v in views]
            yield views, self.y[idx]
