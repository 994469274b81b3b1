"""CIFAR-10/100 from the official python-version tarball (or its extracted folder), via a restricted unpickler.

The batches are Python pickles; :class:`RestrictedUnpickler` only rebuilds plain containers and numpy
arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from fewshifts.data.download import Remote, download_file, find_files, search_roots, user_roots
from fewshifts.data.tensor import ArrayDataset

__all__ = ["RestrictedUnpickler", "safe_unpickle", "cifar", "CIFAR"]

CIFAR = {
    "cifar10": (Remote("https://www.cs.toronto.edu/~kriz/",
                       {"cifar-10-python.tar.gz": "md5:c58f30108f718f92721af3b95e74349a"}),
                "cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                        "data_batch_5"], ["test_batch"], "batches.meta", b"labels", b"label_names"),
    "cifar100": (Remote("https://www.cs.toronto.edu/~kriz/",
                        {"cifar-100-python.tar.gz": "md5:eb9058c3a382ffc7106e4002c42a8d85"}),
                 "cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names"),
}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytearray"), ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only builtin containers/scalars and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name} (only numpy arrays and plain "
                                     "containers are allowed)")


def safe_unpickle(data: bytes, source: str) -> object:
    """Unpickle ``data`` (Python 2 CIFAR batches included) with :class:`RestrictedUnpickler`; errors name ``source``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:
        raise ValueError(f"{source}: not a valid CIFAR file ({type(exc).__name__}: {exc})") from exc


def _read_dict(read, name: str, where: str) -> tuple[dict, str]:
    """(the unpickled dict of CIFAR file ``name``, its source for messages)."""
    source = f"{where}/{name}"
    d = safe_unpickle(read(name), source)
    if not isinstance(d, dict):
        raise ValueError(f"{source}: CIFAR file should hold a dict instead of {type(d).__name__}")
    return d, source


def _key(d: dict, key: bytes, source: str):
    for k in (key, key.decode()):
        if k in d:
            return d[k]
    raise ValueError(f"{source}: no {key.decode()!r} entry")


def _read_batches(read, names: list[str], label_key: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        batch, source = _read_dict(read, name, where)
        data, lab = np.asarray(_key(batch, b"data", source)), np.asarray(_key(batch, label_key, source))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{source}: data should be uint8 (N, 3072) instead of {data.dtype} {data.shape}")
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{source}: {label_key.decode()} should be integers (N,) instead of {lab.dtype} "
                             f"{lab.shape}")
        if len(lab) != len(data):
            raise ValueError(f"{source}: {len(lab)} labels for {len(data)} images")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _read_classes(read, meta: str, names_key: bytes, where: str) -> tuple[str, ...]:
    """The class names in the meta file."""
    meta_dict, source = _read_dict(read, meta, where)
    return tuple(c.decode() if isinstance(c, bytes) else str(c) for c in _key(meta_dict, names_key, source))


def cifar(name: str = "cifar10", data_dir: str | os.PathLike | None = None, train: bool = True,
          download: bool = True, remote: Remote | None = None) -> ArrayDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) as a uint8 (N, 3, 32, 32) :class:`ArrayDataset`.

    Read from ``data_dir``'s extracted folder or tarball, else the first other root's extracted folder, else the
    first other root's tarball, else downloaded.
    """
    if name not in CIFAR:
        raise ValueError(f"name should be one of {tuple(CIFAR)} instead of {name!r}")
    default_remote, folder, train_names, test_names, meta, label_key, names_key = CIFAR[name]
    remote = remote or default_remote
    tar_name = next(iter(default_remote.checksums))
    names, others = (train_names, test_names) if train else (test_names, train_names)
    needed = [*names, meta]
    own = user_roots(data_dir)[0] if data_dir is not None else None  # the first root searched
    own_tar = _find_tar(tar_name, [own]) if own is not None else None
    if own_tar is None:
        extracted = find_files(folder, needed, data_dir, others)
    else:  # data_dir's tarball comes before the other roots' extracted copies (not before data_dir's own)
        extracted = next((d for d in (own / folder, own) if all((d / n).is_file() for n in needed)), None)
    if extracted is not None:
        where = str(extracted)
        read = lambda n: _read_bytes(extracted / n)
        images, labels = _read_batches(read, names, label_key, where)
        classes = _read_classes(read, meta, names_key, where)
    else:
        tar_path = own_tar or _find_or_download_tar(tar_name, remote, data_dir, download)
        try:
            with tarfile.open(tar_path, "r:gz") as tar:
                read = lambda n: _tar_member(tar, f"{folder}/{n}", tar_path)
                images, labels = _read_batches(read, names, label_key, str(tar_path))
                classes = _read_classes(read, meta, names_key, str(tar_path))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ValueError(f"{tar_path}: corrupt or truncated tarball ({exc})") from exc
        where = str(tar_path)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"{where}: labels outside [0, {len(classes)})")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, mean, std, where)


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _tar_member(tar: tarfile.TarFile, member: str, tar_path: Path) -> bytes:
    try:
        f = tar.extractfile(member)
    except KeyError:
        f = None
    if f is None:
        raise ValueError(f"{tar_path}: tarball has no member {member!r}")
    return f.read()


def _find_tar(tar_name: str, roots: list[Path]) -> Path | None:
    """The first ``root/cifar/<tar_name>`` or ``root/<tar_name>`` file, or None."""
    return next((d / tar_name for root in roots for d in (root / "cifar", root) if (d / tar_name).is_file()), None)


def _find_or_download_tar(tar_name: str, remote: Remote, data_dir, download: bool) -> Path:
    found = _find_tar(tar_name, search_roots(data_dir))
    if found is not None:
        return found
    if not download:
        tried = ", ".join(str(r) for r in search_roots(data_dir))
        raise FileNotFoundError(f"{tar_name} (or its extracted folder) not found under any of {tried}")
    dest = user_roots(data_dir)[0] / "cifar" / tar_name
    url = remote.base_url.rstrip("/") + "/" + tar_name
    print(f"downloading {url} -> {dest}", flush=True)
    return download_file(url, dest, remote.checksums.get(tar_name))
