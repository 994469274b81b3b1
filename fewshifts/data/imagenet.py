"""ImageFolder-style ImageNet (``root/{train,val}/<class>/<image>``): PIL decoding in DataLoader workers.

Training: random-resized crop 224 (scale 0.08-1, ratio 3/4-4/3) + horizontal flip (+ optional colour
distortion); evaluation: resize 256 + centre crop 224. Workers return uint8 tensors; normalization happens
on the device, as for the small datasets.
"""

from __future__ import annotations

import copy
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from fewshifts.data.tensor import check_batch_size, check_subset, epoch_generator, shard

__all__ = ["ImageFolder", "ImageFolderLoader", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def random_resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Inception-style crop: a random area fraction and aspect ratio, resized to ``size`` x ``size``."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return center_crop(resize_short(img, size), size)  # fallback: whole image


def resize_short(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is ``size``."""
    w, h = img.size
    s = size / min(w, h)
    return img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    x, y = (w - size) // 2, (h - size) // 2
    return img.crop((x, y, x + size, y + size))


def color_distort(img: Image.Image, rng: random.Random, strength: float = 0.4) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - s, 1 + s], in random order."""
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    rng.shuffle(ops)
    for op in ops:
        img = op(img).enhance(rng.uniform(1 - strength, 1 + strength))
    return img


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` files, classes sorted by name; items are (uint8 (3, S, S) tensor, label)."""

    def __init__(self, root: str | os.PathLike, train: bool, size: int = 224, resize: int = 256,
                 color_jitter: float = 0.0, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.classes = tuple(sorted(d.name for d in self.root.iterdir() if d.is_dir()))
        if not self.classes:
            raise ValueError(f"{self.root}: no class folders")
        self.samples = [(p, i) for i, c in enumerate(self.classes) for p in sorted((self.root / c).iterdir())
                        if p.suffix.lower() in EXTENSIONS]
        if not self.samples:
            raise ValueError(f"{self.root}: no images with extensions {EXTENSIONS}")
        self.train, self.size, self.resize, self.color_jitter = train, size, resize, color_jitter
        self.seed, self.epoch, self.jitter_epochs = seed, 0, 1 << 30

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, n: int | None) -> ImageFolder:
        """``n`` images evenly spaced over the class-sorted list (all when None or more than there are), so
        that every class keeps its share: the first ``n`` would hold only the first classes."""
        if n is None:
            return self
        check_subset(n)
        folder, total = copy.copy(self), len(self.samples)
        folder.samples = [self.samples[i * total // n] for i in range(n)] if n < total else list(self.samples)
        return folder

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except (OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"{path}: cannot decode image ({exc})") from exc
        if self.train:  # per-(seed, epoch, index) randomness: independent of worker count and order
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            img = random_resized_crop(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            if self.color_jitter > 0 and self.epoch < self.jitter_epochs:
                img = color_distort(img, rng, self.color_jitter)
        else:
            img = center_crop(resize_short(img, self.resize), self.size)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), label


class ImageFolderLoader:
    """The :class:`~fewshifts.data.tensor.DeviceLoader` interface over an :class:`ImageFolder` with workers."""

    def __init__(self, dataset: ImageFolder, batch_size: int, train: bool, device: torch.device | str = "cpu",
                 seed: int = 0, rank: int = 0, world: int = 1, workers: int = 8, channels_last: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        check_batch_size(batch_size, world, train, len(dataset), str(dataset.root))
        self.dataset, self.batch_size, self.train, self.device = dataset, batch_size, train, torch.device(device)
        self.seed, self.rank, self.world, self.workers, self.channels_last = seed, rank, world, workers, channels_last
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        n, b = len(self.dataset), self.batch_size
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.train else torch.arange(n)
        per_rank = [shard(order[i * b: (i + 1) * b], self.rank, self.world).tolist() for i in range(start, len(self))]
        self.dataset.epoch = epoch
        loader = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=[s for s in per_rank if s],
                                                  num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                                  persistent_workers=False))
        size = self.dataset.size
        for indices in per_rank:  # an evaluation batch smaller than world leaves some ranks 0 rows (as DeviceLoader)
            x, y = next(loader) if indices else (torch.empty(0, 3, size, size, dtype=torch.uint8),
                                                 torch.empty(0, dtype=torch.int64))
            x = (x.to(self.device, non_blocking=True).float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
