"""Small datasets held as one uint8 tensor on the training device, with batched augmentation (airbench style).

Each epoch's order and augmentation are drawn from a generator seeded by (seed, epoch), so the batch at
(epoch, index) is a pure function of the seed: resuming mid-epoch needs only those two numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ArrayDataset", "DeviceLoader", "check_batch_size", "epoch_generator", "shard"]


@dataclass
class ArrayDataset:
    """Images as uint8 (N, C, H, W), labels as int64 (N,), class names, and per-channel mean/std in [0, 1]."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images should be a uint8 (N, C, H, W) tensor instead of {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None:
            return self
        check_subset(n)
        return ArrayDataset(self.images[:n], self.labels[:n], self.classes, self.mean, self.std, self.source)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


def shard(indices: Tensor, rank: int, world: int) -> Tensor:
    """This rank's contiguous share of a global batch (or of the evaluation set)."""
    n = len(indices)
    return indices[rank * n // world: (rank + 1) * n // world]


def check_subset(n: int) -> None:
    """A subset size is a positive integer (``None``, all examples, is the caller's to handle)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"subset should be a positive integer instead of {n!r}")


def check_batch_size(batch_size: int, world: int, train: bool, examples: int, source: str) -> None:
    """A global batch splits evenly over ``world`` processes, and training has at least one full batch."""
    if batch_size < world or batch_size % world:
        raise ValueError(f"batch_size should be a multiple of the {world} processes instead of {batch_size}")
    if train and examples < batch_size:
        raise ValueError(f"{source}: {examples} training examples are fewer than one batch of {batch_size}")


class DeviceLoader:
    """Batches of a uint8 :class:`ArrayDataset` kept on ``device``: randperm shuffle, pad-and-crop, flip, normalize.

    ``batch_size`` is the global batch; under DDP each of ``world`` ranks takes its own contiguous share of it.
    Training drops the last partial batch; evaluation keeps every example once.
    """

    def __init__(self, data: ArrayDataset, batch_size: int, train: bool, device: torch.device | str = "cpu",
                 seed: int = 0, rank: int = 0, world: int = 1, crop_padding: int = 4, flip: bool = True,
                 channels_last: bool = False) -> None:
        check_batch_size(batch_size, world, train, len(data), data.source)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.seed, self.rank, self.world = batch_size, train, seed, rank, world
        self.crop_padding, self.flip, self.channels_last = crop_padding if train else 0, flip and train, channels_last
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(data.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(data.std, device=self.device).view(shape) * 255

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of ``epoch`` as (normalized float images, labels) on the device."""
        n = len(self.labels)
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        p = self.crop_padding
        offsets = torch.randint(0, 2 * p + 1, (n, 2), generator=g) if p else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        for i in range(start, len(self)):
            idx = shard(order[i * self.batch_size: (i + 1) * self.batch_size], self.rank, self.world)
            x = self.images[idx.to(self.device)]
            if offsets is not None:
                x = random_crop(x, offsets[idx].to(self.device), p)
            if flips is not None:
                x = torch.where(flips[idx].to(self.device).view(-1, 1, 1, 1), x.flip(-1), x)
            x = (x.float() - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx.to(self.device)]


def random_crop(x: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Zero-pad a batch by ``padding`` and crop each image back to its size at its own (dy, dx) offset."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(n, 1, h, 1)
    cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chans, rows, cols]
