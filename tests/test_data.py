"""Datasets: idx/CIFAR/ImageFolder readers on small files written in the real formats, downloads, loaders."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import re
import tarfile
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fewshifts.data import (
    DeviceLoader,
    ImageFolder,
    ImageFolderLoader,
    Remote,
    build_loader,
    cifar,
    download_file,
    fashion_mnist,
    find_files,
    read_idx,
    safe_unpickle,
)
from fewshifts.data.mnist import write_idx
from fewshifts.data.tensor import ArrayDataset, random_crop, shard

FMNIST_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz"]


def write_fmnist(folder, n_train=64, n_test=32, seed=0):
    """A Fashion-MNIST-format folder of random images; returns {file name: md5}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return {name: "md5:" + hashlib.md5((folder / name).read_bytes()).hexdigest() for name in FMNIST_NAMES}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No user data roots or system datasets leak into the search."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FEWSHIFTS_DATA", raising=False)
    monkeypatch.setattr("fewshifts.data.download.SYSTEM_ROOTS", ())
    return tmp_path


# ------------------------------------------------------------------ idx / Fashion-MNIST
def test_idx_round_trip(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a.idx", "a.idx.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, a), 3), a)


def test_fashion_mnist_from_data_dir(isolated):
    write_fmnist(isolated / "data" / "fashion-mnist", n_train=40, n_test=8)
    train, test = fashion_mnist(isolated / "data", train=True), fashion_mnist(isolated / "data", train=False)
    assert train.images.shape == (40, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.labels.shape == (8,) and test.labels.dtype == torch.int64


def test_search_order(isolated, monkeypatch):
    write_fmnist(isolated / "first", n_train=10)
    write_fmnist(isolated / "env" / "fashion-mnist", n_train=20)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    assert len(fashion_mnist(isolated / "first")) == 10
    assert len(fashion_mnist(None)) == 20
    assert find_files("fashion-mnist", FMNIST_NAMES, isolated / "nowhere") == isolated / "env" / "fashion-mnist"


@pytest.mark.parametrize("defect, message", [
    ("magic", "magic number"), ("truncated_gz", "corrupt or truncated"), ("short", "truncated or corrupt"),
    ("count", "labels for"), ("not_gzip", "corrupt or truncated"),
])
def test_bad_idx_files_name_the_file(isolated, defect, message):
    folder = isolated / "fashion-mnist"
    write_fmnist(folder, n_train=16)
    images, labels = folder / FMNIST_NAMES[0], folder / FMNIST_NAMES[1]
    raw = gzip.decompress(images.read_bytes())
    bad = {"magic": labels, "truncated_gz": images, "short": images, "count": labels, "not_gzip": images}[defect]
    if defect == "magic":
        data = gzip.decompress(labels.read_bytes())
        labels.write_bytes(gzip.compress(data[:3] + b"\x03" + data[4:]))
    elif defect == "truncated_gz":
        images.write_bytes(images.read_bytes()[:200])
    elif defect == "short":
        images.write_bytes(gzip.compress(raw[:-28]))
    elif defect == "count":
        write_idx(labels, np.zeros(15, dtype=np.uint8))
    else:
        images.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=message) as info:
        fashion_mnist(isolated)
    assert str(bad) in str(info.value)


def test_missing_idx_file_is_not_called_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="idx file not found") as info:
        read_idx(tmp_path / "absent-idx1-ubyte.gz", 1)
    assert "absent-idx1-ubyte.gz" in str(info.value) and "corrupt" not in str(info.value)


def test_fashion_mnist_rejects_images_that_are_not_28x28(isolated):
    folder = isolated / "fashion-mnist"
    write_fmnist(folder, n_train=5)
    write_idx(folder / FMNIST_NAMES[0], np.zeros((5, 27, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="images should be 28x28 instead of 27x28") as info:
        fashion_mnist(isolated)
    assert str(folder / FMNIST_NAMES[0]) in str(info.value)


def test_partial_data_dir_warns_naming_the_missing_files(isolated, monkeypatch):
    write_fmnist(isolated / "env" / "fashion-mnist", n_train=20)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    given = isolated / "given" / "fashion-mnist"
    given.mkdir(parents=True)
    write_idx(given / FMNIST_NAMES[0], np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.warns(UserWarning, match=f"{re.escape(str(given))}.*train-labels-idx1-ubyte.gz missing"):
        data = fashion_mnist(isolated / "given")
    assert len(data) == 20  # the complete copy further down the search order


def test_partial_fewshifts_data_warns_naming_the_missing_files(isolated, monkeypatch):
    write_fmnist(isolated / "home" / ".cache" / "fewshifts" / "fashion-mnist", n_train=12)
    env = isolated / "env" / "fashion-mnist"
    env.mkdir(parents=True)
    write_idx(env / FMNIST_NAMES[1], np.zeros(3, dtype=np.uint8))
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    with pytest.warns(UserWarning, match=f"{re.escape(str(env))}.*train-images-idx3-ubyte.gz missing") as record:
        assert len(fashion_mnist()) == 12  # the complete copy in ~/.cache/fewshifts
    assert record[0].filename == __file__
    write_idx(env / FMNIST_NAMES[0], np.zeros((3, 28, 28), dtype=np.uint8))
    with warnings.catch_warnings():  # complete now: no warning
        warnings.simplefilter("error")
        assert len(fashion_mnist()) == 3


def test_data_dir_holding_only_the_other_split_warns(isolated, monkeypatch):
    given = isolated / "given" / "fashion-mnist"
    write_fmnist(given, n_train=16)
    for name in FMNIST_NAMES[2:]:  # the train split only
        (given / name).unlink()
    message = (f"{re.escape(str(given))} .*t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz missing.*"
               "searching the other data roots")
    with pytest.warns(UserWarning, match=message), pytest.raises(FileNotFoundError, match="not found"):
        fashion_mnist(isolated / "given", train=False, download=False)
    write_fmnist(isolated / "env" / "fashion-mnist", n_test=8)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    with pytest.warns(UserWarning, match=message):
        assert len(fashion_mnist(isolated / "given", train=False, download=False)) == 8  # from $FEWSHIFTS_DATA
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fashion_mnist(isolated / "given", train=True, download=False)) == 16


def test_data_dir_split_in_its_root_does_not_warn(isolated):
    """data_dir/fashion-mnist holds the train split only and data_dir itself the test split: the test split comes
    from data_dir, so nothing is searched elsewhere and nothing is warned about."""
    given = isolated / "given"
    write_fmnist(given / "fashion-mnist", n_train=16, n_test=4)
    write_fmnist(given, n_train=20, n_test=8)
    for name in FMNIST_NAMES[2:]:
        (given / "fashion-mnist" / name).unlink()
    for name in FMNIST_NAMES[:2]:
        (given / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fashion_mnist(given, train=False, download=False)) == 8
        assert len(fashion_mnist(given, train=True, download=False)) == 16


def test_data_dir_holding_both_splits_does_not_warn(isolated, monkeypatch):
    write_fmnist(isolated / "given" / "fashion-mnist", n_train=16, n_test=4)
    write_fmnist(isolated / "env" / "fashion-mnist", n_train=20, n_test=8)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(fashion_mnist(isolated / "given", train=True, download=False)) == 16
        assert len(fashion_mnist(isolated / "given", train=False, download=False)) == 4


# ------------------------------------------------------------------ downloads against a local server
@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_download_with_good_checksums(isolated, server):
    root, url = server
    sums = write_fmnist(root, n_train=24, n_test=8)
    data = fashion_mnist(isolated / "dl", train=True, remote=Remote(url, sums))
    assert len(data) == 24
    assert (isolated / "dl" / "fashion-mnist" / FMNIST_NAMES[0]).is_file()
    sha = hashlib.sha256((root / FMNIST_NAMES[1]).read_bytes()).hexdigest()
    assert download_file(url + FMNIST_NAMES[1], isolated / "x.gz", "sha256:" + sha).is_file()


def test_download_with_bad_checksum_leaves_nothing(isolated, server):
    root, url = server
    sums = write_fmnist(root)
    sums[FMNIST_NAMES[0]] = "md5:" + "0" * 32
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        fashion_mnist(isolated / "dl", remote=Remote(url, sums))
    assert FMNIST_NAMES[0] in str(info.value)
    assert not list((isolated / "dl" / "fashion-mnist").glob("train-images*"))
    with pytest.raises(OSError, match="could not download"):
        download_file(url + "missing.gz", isolated / "m.gz")


def test_no_download_when_disabled(isolated):
    with pytest.raises(FileNotFoundError, match="not found"):
        fashion_mnist(isolated / "empty", download=False)


# ------------------------------------------------------------------ CIFAR
def _batch(n, rng, label_key=b"labels"):
    return {b"batch_label": b"batch", label_key: rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def write_cifar10(folder, n=6, seed=0):
    """The cifar-10-batches-py layout with ``n`` images per batch file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_batch(n, rng), protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_cases_per_batch": n}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_cifar10_tar(tar_path, folder):
    """The official tarball of an extracted cifar-10-batches-py ``folder``."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")


def test_cifar10_tarball_and_folder(isolated):
    write_cifar10(isolated / "src" / "cifar-10-batches-py")
    write_cifar10_tar(isolated / "tar" / "cifar-10-python.tar.gz", isolated / "src" / "cifar-10-batches-py")
    from_tar = cifar("cifar10", isolated / "tar", train=True, download=False)
    from_dir = cifar("cifar10", isolated / "src", train=True, download=False)
    assert from_tar.images.shape == (30, 3, 32, 32) and from_tar.classes[3] == "class3"
    assert torch.equal(from_tar.images, from_dir.images) and torch.equal(from_tar.labels, from_dir.labels)
    assert len(cifar("cifar10", isolated / "tar", train=False, download=False)) == 6


@pytest.mark.parametrize("where", [".", "cifar"])
def test_cifar_data_dir_tarball_beats_other_roots_extracted_copies(isolated, monkeypatch, where):
    write_cifar10(isolated / "env" / "cifar-10-batches-py", n=6)  # another root: extracted, 6 images a batch
    write_cifar10(isolated / "home" / ".cache" / "fewshifts" / "cifar-10-batches-py", n=5)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    write_cifar10(isolated / "src" / "cifar-10-batches-py", n=2, seed=1)
    given = isolated / "given"
    tar_path = given / where / "cifar-10-python.tar.gz"
    write_cifar10_tar(tar_path, isolated / "src" / "cifar-10-batches-py")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = cifar("cifar10", given, train=True, download=False)
        assert len(data) == 10 and data.source == str(tar_path)  # data_dir's tarball, not $FEWSHIFTS_DATA's copy
        assert len(cifar("cifar10", given, train=False, download=False)) == 2
        (given / "cifar-10-batches-py").mkdir()  # a partial extraction beside the tarball: the tarball is used
        (given / "cifar-10-batches-py" / "batches.meta").write_bytes(
            (isolated / "src" / "cifar-10-batches-py" / "batches.meta").read_bytes())
        assert len(cifar("cifar10", given, train=True, download=False)) == 10
        assert len(cifar("cifar10", None, train=True, download=False)) == 30  # without data_dir: search order
    write_cifar10(given / "extracted" / "cifar-10-batches-py", n=3)  # data_dir's extracted copy beats its tarball
    (given / "extracted" / "cifar-10-python.tar.gz").write_bytes(tar_path.read_bytes())
    assert len(cifar("cifar10", given / "extracted", train=True, download=False)) == 15


def test_cifar100_layout(isolated):
    rng = np.random.default_rng(1)
    folder = isolated / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 7), ("test", 3)):
        batch = _batch(n, rng, b"fine_labels")
        batch[b"coarse_labels"] = [0] * n
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    data = cifar("cifar100", isolated, train=True, download=False)
    assert len(data) == 7 and len(data.classes) == 100


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({b"data": _Evil()}, protocol=2)
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        safe_unpickle(payload, "evil_batch")
    assert not (tmp_path / "pwned").exists()
    assert isinstance(safe_unpickle(pickle.dumps({b"a": np.zeros(3, np.uint8)}, protocol=5), "ok")[b"a"], np.ndarray)


def test_cifar_bad_batch_names_the_file(isolated):
    write_cifar10(isolated / "cifar-10-batches-py")
    bad = isolated / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_3"):
        cifar("cifar10", isolated, download=False)


@pytest.mark.parametrize("labels, message", [
    (["cat"] * 6, "labels should be integers \\(N,\\) instead of <U3 \\(6,\\)"),
    (3, "labels should be integers \\(N,\\) instead of int64 \\(\\)"),
    ([1.7, 2.2, 0.0, 1.0, 2.0, 3.0], "labels should be integers \\(N,\\) instead of float64 \\(6,\\)"),
])
def test_cifar_bad_labels_name_the_file(isolated, labels, message):
    write_cifar10(isolated / "cifar-10-batches-py")
    bad = isolated / "cifar-10-batches-py" / "data_batch_2"
    batch = _batch(6, np.random.default_rng(0))
    batch[b"labels"] = labels
    bad.write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=message) as info:
        cifar("cifar10", isolated, download=False)
    assert str(bad) in str(info.value)


def test_cifar_meta_without_class_names_names_the_meta_file(isolated):
    write_cifar10(isolated / "cifar-10-batches-py")
    meta = isolated / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"num_cases_per_batch": 6}, protocol=2))
    with pytest.raises(ValueError, match=f"^{re.escape(str(meta))}: no 'label_names' entry$"):
        cifar("cifar10", isolated, download=False)


# ------------------------------------------------------------------ loaders
def _dataset(n=40, c=1, size=8):
    images = torch.arange(n * c * size * size).remainder(251).to(torch.uint8).view(n, c, size, size)
    return ArrayDataset(images, torch.arange(n) % 10, tuple("abcdefghij"), (0.5,) * c, (0.25,) * c, "test")


def test_device_loader_shapes_determinism_and_shards():
    data = _dataset()
    loader = DeviceLoader(data, 8, train=True, seed=3)
    assert len(loader) == 5
    a, b = list(loader.batches(epoch=1)), list(loader.batches(epoch=1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(a[0][1], next(loader.batches(epoch=2))[1])
    assert torch.equal(next(iter(loader.batches(epoch=1, start=3)))[0], a[3][0])  # resuming mid-epoch
    assert a[0][0].dtype == torch.float32 and a[0][0].shape == (8, 1, 8, 8)
    ranks = [DeviceLoader(data, 8, True, seed=3, rank=r, world=2) for r in range(2)]
    halves = [next(r.batches(epoch=1)) for r in ranks]
    assert torch.equal(torch.cat([h[1] for h in halves]), a[0][1])
    assert torch.equal(torch.cat([h[0] for h in halves]), a[0][0])
    evaluation = DeviceLoader(data, 16, train=False)
    assert sum(len(y) for _, y in evaluation.batches()) == 40


def test_random_crop_matches_per_image_crop():
    x = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8)
    offsets = torch.randint(0, 9, (5, 2))
    out = random_crop(x, offsets, 4)
    padded = torch.nn.functional.pad(x, (4,) * 4)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 7])
    assert torch.equal(shard(torch.arange(10), 1, 2), torch.arange(5, 10))


def test_loader_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple"):
        DeviceLoader(_dataset(), 7, True, world=2)
    with pytest.raises(ValueError, match="fewer than one batch"):
        DeviceLoader(_dataset(4), 8, True)
    with pytest.raises(ValueError, match="dataset should be one of"):
        build_loader("mnist-digits", True, 8)


def test_image_folder_loader_rejects_bad_sizes(tmp_path):
    _write_image_folder(tmp_path)
    folder = ImageFolder(tmp_path, train=True, size=16)
    with pytest.raises(ValueError, match="6 training examples are fewer than one batch of 8") as info:
        ImageFolderLoader(folder, 8, True, workers=0)
    assert str(info.value).startswith(f"{tmp_path}: ")
    with pytest.raises(ValueError, match="multiple of the 2 processes instead of 0"):
        ImageFolderLoader(folder, 0, False, workers=0, world=2)


def _write_image_folder(root, size=(40, 30)):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")


def test_image_folder_train_and_eval_transforms(tmp_path):
    _write_image_folder(tmp_path / "train")
    train = ImageFolder(tmp_path / "train", train=True, size=24, color_jitter=0.4, seed=1)
    x, y = train[4]
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == 1 and train.classes == ("cat", "dog")
    assert torch.equal(train[4][0], x)  # deterministic per (seed, epoch, index)
    evaluation = ImageFolder(tmp_path / "train", train=False, size=24, resize=28)
    assert evaluation[0][0].shape == (3, 24, 24)
    loader = ImageFolderLoader(train, 2, train=True, workers=0)
    batches = list(loader.batches(epoch=0))
    assert len(batches) == 3 and batches[0][0].shape == (2, 3, 24, 24) and batches[0][0].dtype == torch.float32


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_subset_size_is_checked_by_both_datasets(tmp_path, bad):
    """ArrayDataset.subset and ImageFolder.subset refuse the same sizes with the same message; None means all."""
    arrays = ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ("a",),
                          (0.5,), (0.5,))
    _write_image_folder(tmp_path / "train")
    folder = ImageFolder(tmp_path / "train", train=False, size=24, resize=28)
    for dataset in (arrays, folder):
        assert dataset.subset(None) is dataset
        with pytest.raises(ValueError, match=re.escape(f"subset should be a positive integer instead of {bad!r}")):
            dataset.subset(bad)


def test_imagenet_subset_spans_all_classes(isolated):
    for split in ("train", "val"):
        _write_image_folder(isolated / "imagenet" / split)
    loader = build_loader("imagenet", False, 2, data_dir=isolated, subset=2, workers=0)
    assert [label for _, label in loader.dataset.samples] == [0, 1]  # the first 2 would both be cats
    assert len(build_loader("imagenet", False, 2, data_dir=isolated, subset=100, workers=0).dataset) == 6


@pytest.mark.parametrize("present, missing, sub", [("train", "val", "imagenet"), ("val", "train", ".")])
def test_imagenet_data_dir_with_one_split_warns(isolated, monkeypatch, present, missing, sub):
    for split in ("train", "val"):
        _write_image_folder(isolated / "env" / "imagenet" / split)
    monkeypatch.setenv("FEWSHIFTS_DATA", str(isolated / "env"))
    given = isolated / "given" / sub
    _write_image_folder(given / present, size=(30, 40))
    message = f"{re.escape(str(given))} holds only some of the imagenet .*\\({missing} missing\\); searching the other"
    with pytest.warns(UserWarning, match=message) as record:
        loader = build_loader("imagenet", False, 2, data_dir=isolated / "given", workers=0)
    assert loader.dataset.root == isolated / "env" / "imagenet" / "val"  # the complete root further down
    assert record[0].filename == __file__  # the warning names the user's call, not a line inside fewshifts
    monkeypatch.delenv("FEWSHIFTS_DATA")
    with pytest.warns(UserWarning, match=message), pytest.raises(FileNotFoundError, match="ImageNet"):
        build_loader("imagenet", False, 2, data_dir=isolated / "given", workers=0)
    _write_image_folder(given / missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_loader("imagenet", True, 2, data_dir=isolated / "given", workers=0).dataset.root == given / "train"


def test_image_folder_loader_gives_ranks_past_the_last_batch_no_rows(tmp_path):
    """5 images in batches of 4 over 2 ranks: the last batch holds 1 image, so rank 0 gets 0 rows (as DeviceLoader)."""
    _write_image_folder(tmp_path)
    folder = ImageFolder(tmp_path, train=False, size=16, resize=20)
    folder.samples = folder.samples[:5]
    for rank in range(2):
        got = list(ImageFolderLoader(folder, 4, False, workers=0, rank=rank, world=2).batches())
        expected = list(DeviceLoader(_dataset(5, c=3, size=16), 4, False, rank=rank, world=2).batches())
        assert [(x.shape, x.dtype, y.dtype) for x, y in got] == [(x.shape, x.dtype, y.dtype) for x, y in expected]
        assert [len(y) for _, y in got] == [[2, 0], [2, 1]][rank]


def test_image_folder_corrupt_image_names_file(tmp_path):
    _write_image_folder(tmp_path)
    (tmp_path / "dog" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    folder = ImageFolder(tmp_path, train=False, size=16, resize=20)
    with pytest.raises(ValueError, match=r"1\.jpg"):
        folder[4]


@pytest.mark.skipif(find_files("fashion-mnist", FMNIST_NAMES) is None, reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    test = fashion_mnist(train=False)
    assert test.images.shape == (10000, 1, 28, 28) and set(test.labels.unique().tolist()) == set(range(10))
    assert abs(test.images.float().mean().item() / 255 - test.mean[0]) < 0.01
