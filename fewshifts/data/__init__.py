"""Datasets (design: issue 4): Fashion-MNIST, CIFAR-10/100 and ImageFolder ImageNet, and their batch loaders.

:func:`build_loader` is what training uses: it returns an object with ``len()`` (batches per epoch) and
``batches(epoch, start)`` yielding normalized float images and labels on the device.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fewshifts.data.cifar import RestrictedUnpickler, cifar, safe_unpickle
from fewshifts.data.download import Remote, download_file, fetch, find_files, search_roots
from fewshifts.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageFolderLoader
from fewshifts.data.mnist import fashion_mnist, read_idx
from fewshifts.data.tensor import ArrayDataset, DeviceLoader

__all__ = [
    "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "ArrayDataset", "DeviceLoader", "ImageFolder",
    "ImageFolderLoader", "Remote", "RestrictedUnpickler", "build_loader", "cifar", "dataset_info",
    "download_file", "fashion_mnist", "fetch", "find_files", "read_idx", "safe_unpickle", "search_roots"
]

# name -> (input channels, classes, image size)
DATASETS = {"fashion-mnist": (1, 10, 28), "cifar10": (3, 10, 32), "cifar100": (3, 100, 32), "imagenet": (3, 1000, 224)}


def dataset_info(name: str) -> tuple[int, int, int]:
    """(input channels, number of classes, image size) of a dataset name."""
    if name not in DATASETS:
        raise ValueError(f"dataset should be one of {tuple(DATASETS)} instead of {name!r}")
    return DATASETS[name]


def load_arrays(name: str, train: bool, data_dir: str | os.PathLike | None = None) -> ArrayDataset:
    """A small dataset split held in memory."""
    dataset_info(name)
    if name == "fashion-mnist":
        return fashion_mnist(data_dir, train)
    if name in ("cifar10", "cifar100"):
        return cifar(name, data_dir, train)
    raise ValueError(f"{name} is not an in-memory dataset")


def _imagenet_root(data_dir: str | os.PathLike | None) -> Path:
    """The first ``root/imagenet`` or ``root`` holding both ``train/`` and ``val/`` (a ``data_dir`` holding only
    one of them is warned about, as by :func:`find_files`)."""
    found = find_files("imagenet", ["train", "val"], data_dir, dirs=True)
    if found is not None:
        return found
    raise FileNotFoundError(f"ImageNet (train/ and val/ class folders) not found under any of "
                            f"{', '.join(map(str, search_roots(data_dir)))}; it cannot be downloaded automatically")


def build_loader(name: str, train: bool, batch_size: int, device: torch.device | str = "cpu",
                 data_dir: str | os.PathLike | None = None, subset: int | None = None, seed: int = 0,
                 rank: int = 0, world: int = 1, channels_last: bool = False, workers: int = 8,
                 color_jitter: float = 0.0) -> DeviceLoader | ImageFolderLoader:
    """The training or evaluation batch loader of a dataset; ``subset`` keeps N examples: the first N, or for
    ImageNet (whose files are sorted by class) N spread evenly over the classes."""
    if name == "imagenet":
        folder = ImageFolder(_imagenet_root(data_dir) / ("train" if train else "val"), train,
                             color_jitter=color_jitter, seed=seed).subset(subset)
        return ImageFolderLoader(folder, batch_size, train, device, seed, rank, world, workers, channels_last)
    data = load_arrays(name, train, data_dir)
    return DeviceLoader(data.subset(subset), batch_size, train, device, seed, rank, world,
                        channels_last=channels_last)
