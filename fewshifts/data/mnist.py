"""Fashion-MNIST from the original idx.gz files (Xiao et al. 2017), read without any third-party loader."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from fewshifts.data.download import Remote, fetch
from fewshifts.data.tensor import ArrayDataset

__all__ = ["read_idx", "write_idx", "fashion_mnist", "FASHION_MNIST"]

FASHION_MNIST = Remote(
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An unsigned-byte idx file (gzipped or not) of ``ndim`` dimensions; any defect raises ValueError naming it
    (FileNotFoundError when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file not found: {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated file ({exc})") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number {data[:4].hex()})")
    if data[2] != 0x08 or data[3] != ndim:
        raise ValueError(f"{path}: wrong magic number {data[:4].hex()}, expected 000008{ndim:02x} "
                         f"(unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                         f"{len(data) - header} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist(data_dir: str | os.PathLike | None = None, train: bool = True, download: bool = True,
                  remote: Remote = FASHION_MNIST) -> ArrayDataset:
    """Fashion-MNIST train (60k) or test (10k) split as a uint8 (N, 1, 28, 28) :class:`ArrayDataset`."""
    prefix, other = ("train", "t10k") if train else ("t10k", "train")
    names = _split_files(prefix)
    folder = fetch("fashion-mnist", names, remote, data_dir, download, others=_split_files(other))
    images, labels = read_idx(folder / names[0], 3), read_idx(folder / names[1], 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{folder / names[0]}: images should be 28x28 instead of {images.shape[1]}x{images.shape[2]}")
    if len(images) != len(labels):
        raise ValueError(f"{folder / names[1]}: {len(labels)} labels for {len(images)} images in {names[0]}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{folder / names[1]}: label {labels.max()} out of range for 10 classes")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, str(folder))


def _split_files(prefix: str) -> list[str]:
    """The images and labels files of a split (``train`` or ``t10k``)."""
    return [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an idx file (gzipped when the name ends in .gz): the inverse of :func:`read_idx`."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())
    return path
