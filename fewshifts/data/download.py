"""Finding dataset files on disk, and downloading them with checksum verification.

Search order for a dataset folder (design: issue 4): ``--data-dir``, ``$FEWSHIFTS_DATA``,
``~/.cache/fewshifts``, then system locations such as Debian's ``/usr/share/datasets``. Each root is
tried as ``root/<folder>/<file>`` and ``root/<file>``; a ``--data-dir`` or ``$FEWSHIFTS_DATA`` holding some of
the dataset's files (of any split; ImageNet: one of ``train/`` and ``val/``) but not all those of the split being
loaded gives a warning naming the missing ones. Downloads go to the first of the user roots.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Remote", "search_roots", "find_files", "download_file", "fetch"]

SYSTEM_ROOTS = ("/usr/share/datasets",)


@dataclass(frozen=True)
class Remote:
    """Where a dataset's files are published: a base URL and each file's checksum (``md5:...`` or ``sha256:...``)."""

    base_url: str
    checksums: dict[str, str] = field(default_factory=dict)


def user_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The writable roots in search order: ``data_dir``, ``$FEWSHIFTS_DATA``, ``~/.cache/fewshifts``."""
    return [*named_roots(data_dir), Path.home() / ".cache" / "fewshifts"]


def named_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The roots that the user named: ``data_dir`` and ``$FEWSHIFTS_DATA``, where given."""
    roots = [data_dir, os.environ.get("FEWSHIFTS_DATA") or None]
    return [Path(r).expanduser() for r in roots if r is not None]


def search_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every root searched for dataset files, in order."""
    return [*user_roots(data_dir), *(Path(r) for r in SYSTEM_ROOTS)]


def find_files(folder: str, names: list[str], data_dir: str | os.PathLike | None = None,
               others: Sequence[str] = (), dirs: bool = False) -> Path | None:
    """The first directory (``root/folder`` or ``root``) holding all of ``names`` (files, or folders when
    ``dirs``), or None.

    A directory of a root that the user named (``data_dir``, ``$FEWSHIFTS_DATA``: :func:`named_roots`) missing
    some of ``names`` but holding any of the dataset's files (``names`` or ``others``, e.g. its other split) is
    warned about, naming the missing files, when neither of that root's two directories holds all of ``names``
    and the search goes on to the next root.
    """
    present, kind = (Path.is_dir, "folders") if dirs else (Path.is_file, "files")
    candidates = [d for root in search_roots(data_dir) for d in (root / folder, root)]
    named = 2 * len(named_roots(data_dir))  # the first candidates: two directories per named root
    partial = []  # the current named root's directories that hold some of the dataset
    for i, d in enumerate(candidates):
        missing = [n for n in names if not present(d / n)]
        if not missing:
            return d
        if i < named and any(present(d / n) for n in [*names, *others]):
            partial.append(f"{d} holds only some of the {folder} {kind} ({', '.join(missing)} missing)")
        if i < named and i % 2 == 1:  # both directories of a named root searched
            for text in partial:
                warnings.warn(f"{text}; searching the other data roots", stacklevel=_outside_package())
            partial = []
    return None


def _outside_package() -> int:
    """The ``stacklevel`` for a warning raised by this module's caller that names the first frame outside the
    fewshifts package: the user's call, however deep the loaders call :func:`find_files`."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(2), 2  # the warning's own frame is level 1 for warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(path: Path, checksum: str) -> None:
    """Raise ValueError naming ``path`` when its digest differs from ``checksum`` (``'md5:..'``/``'sha256:..'``)."""
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not expected:
        raise ValueError(f"checksum should look like 'md5:<hex>' or 'sha256:<hex>' instead of {checksum!r}")
    actual = _digest(path, algorithm)
    if actual != expected.lower():
        raise ValueError(f"{path}: {algorithm} checksum mismatch (expected {expected}, got {actual}); "
                         "the download is corrupt or the server sent a different file")


def download_file(url: str, dest: str | os.PathLike, checksum: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through a temporary file; verify ``checksum`` before moving it into place.

    A failed or mismatching download leaves nothing at ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        if checksum:
            check_file(tmp, checksum)
        os.replace(tmp, dest)
    except OSError as exc:
        raise OSError(f"could not download {url} to {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(folder: str, names: list[str], remote: Remote | None, data_dir: str | os.PathLike | None = None,
          download: bool = True, others: Sequence[str] = ()) -> Path:
    """The directory holding ``names``: found on disk (:func:`find_files`, with the dataset's ``others`` files)
    or downloaded from ``remote``."""
    found = find_files(folder, names, data_dir, others)
    if found is not None:
        return found
    tried = ", ".join(str(r) for r in search_roots(data_dir))
    if not download or remote is None:
        raise FileNotFoundError(f"{folder}: files {names} not found under any of {tried} (downloading is off)")
    target = user_roots(data_dir)[0] / folder
    for name in names:
        if not (target / name).is_file():
            url = remote.base_url.rstrip("/") + "/" + name
            print(f"downloading {url} -> {target / name}", flush=True)
            download_file(url, target / name, remote.checksums.get(name))
    return target
