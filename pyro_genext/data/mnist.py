"""MNIST and Fashion-MNIST: finding, downloading and loading the official IDX files.

Where the files are looked for, in this order (each file with or without ``.gz``):

1. the ``root`` argument, and its subfolder named after the data set;
2. ``$PYRO_GENEXT_DATA``, and its subfolder named after the data set
   (``$PYRO_GENEXT_DATA/fashion-mnist``, ``$PYRO_GENEXT_DATA/mnist``);
3. for Fashion-MNIST, where Debian's package ``dataset-fashion-mnist`` installs it,
   ``/usr/share/datasets/fashion-mnist``;
4. the download cache, ``$PYRO_GENEXT_CACHE/<name>``, by default
   ``~/.cache/pyro_genext/<name>`` (``$XDG_CACHE_HOME`` is honoured);
5. a download of the official files into that cache, each checked against its published
   MD5 before it is moved into place.

A folder counts only if it holds both files a split needs (images and labels). If none
does and the download fails, :class:`DatasetNotFoundError` lists every place looked and
how to fix it.

Splits: ``"test"`` is the official test set (10000 images). The official 60000 training
images are split by a seeded permutation into ``"train"`` (50000) and ``"val"`` (10000);
in general the last sixth of the permutation is the validation set.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import Dataset, check_seed, check_split, image_dataset, split_indices
from .idx import CorruptFileError, read_idx

__all__ = [
    "DatasetNotFoundError",
    "ChecksumError",
    "fashion_mnist",
    "mnist",
    "find_files",
    "read_official",
    "cache_dir",
    "DATA_ENV",
    "CACHE_ENV",
]

log = logging.getLogger(__name__)

DATA_ENV = "PYRO_GENEXT_DATA"
CACHE_ENV = "PYRO_GENEXT_CACHE"
LEVELS = 256
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


@dataclass(frozen=True)
class _Source:
    """What is known about one of the MNIST-like data sets."""

    mirrors: tuple[str, ...]
    md5: dict[str, str]  # official .gz file name -> MD5 of the published file
    system_dirs: tuple[Path, ...] = ()
    system_hint: str = ""


_SOURCES: dict[str, _Source] = {
    # Checksums from the table "MD5 Checksum" in the Fashion-MNIST README
    # (github.com/zalandoresearch/fashion-mnist; Debian ships the same README as
    # /usr/share/doc/dataset-fashion-mnist/README.md.gz). Debian recompresses the files,
    # so its .gz differ from these, but their decompressed contents have the MD5s the
    # Fashion-MNIST community publishes for the raw files (e.g. t10k-images-idx3-ubyte:
    # 8181f5470baa50b63fa0f6fddb340f0a).
    "fashion-mnist": _Source(
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
        system_hint="install the Debian package: apt-get install dataset-fashion-mnist",
    ),
    # The MD5s of the files published at yann.lecun.com/exdb/mnist, the ones
    # torchvision.datasets.MNIST checks against; the S3 and GCS mirrors serve the same bytes.
    "mnist": _Source(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
}

_OFFICIAL = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


#: How the messages name the ``root`` argument (the command line says ``--root`` instead).
ROOT_LABEL = "root= argument"


class DatasetNotFoundError(RuntimeError):
    """The files of a data set are in none of the places looked and could not be
    downloaded. The message lists the places and the ways to fix it, naming the ``root=``
    argument; :attr:`command_line_message` says the same with the ``--root`` flag (what
    the command line prints)."""

    def __init__(self, message: str, command_line_message: str | None = None) -> None:
        super().__init__(message)
        self.command_line_message = command_line_message or message


class ChecksumError(ValueError):
    """A downloaded file whose checksum is not the published one."""


def _source(name: str) -> _Source:
    if name not in _SOURCES:
        raise ValueError(f"unknown IDX data set {name!r}; expected one of {', '.join(map(repr, _SOURCES))}")
    return _SOURCES[name]


def cache_dir(name: str) -> Path:
    """The folder downloads of ``name`` go to: ``$PYRO_GENEXT_CACHE/<name>``, else
    ``$XDG_CACHE_HOME/pyro_genext/<name>``, else ``~/.cache/pyro_genext/<name>``."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pyro_genext" / name


def _in_folder(folder: Path, stems: tuple[str, ...]) -> list[Path] | None:
    """The files ``stems`` (raw preferred over ``.gz``) if ``folder`` holds them all."""
    found = []
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            return None
    return found


def _local_places(name: str, root: str | os.PathLike[str] | None) -> list[tuple[str, Path]]:
    places: list[tuple[str, Path]] = []
    if root is not None:
        folder = Path(root).expanduser()
        places += [(ROOT_LABEL, folder), (ROOT_LABEL, folder / name)]
    env = os.environ.get(DATA_ENV)
    if env:
        folder = Path(env).expanduser()
        places += [(f"${DATA_ENV}", folder), (f"${DATA_ENV}", folder / name)]
    places += [("system location", folder) for folder in _source(name).system_dirs]
    places.append(("download cache", cache_dir(name)))
    return places


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path) -> None:
    """Download ``url`` to the file ``dest``. Tests replace this function."""
    request = urllib.request.Request(url, headers={"User-Agent": "pyro-genext"})
    with urllib.request.urlopen(request, timeout=60) as response, open(dest, "wb") as out:
        while block := response.read(1 << 20):
            out.write(block)


def _download(filename: str, mirrors: tuple[str, ...], md5: str, folder: Path) -> Path:
    """Fetch ``filename`` from the first mirror that serves it with the right MD5.

    Each attempt goes to a temporary file in ``folder``, which is renamed to its final
    name (atomic on one file system) only after its checksum matched; otherwise it is
    deleted. Raises ``OSError`` listing every failed attempt.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename
    failures = []
    for mirror in mirrors:
        url = mirror + filename
        handle, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
        os.close(handle)
        tmp = Path(tmp_name)
        try:
            log.info("downloading %s", url)
            _fetch(url, tmp)
            got = _md5(tmp)
            if got != md5:
                raise ChecksumError(f"{url}: expected MD5 {md5}, got {got}")
            os.replace(tmp, dest)
            return dest
        except (OSError, http.client.HTTPException, ChecksumError) as error:
            failures.append(f"{url}: {error}")
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError("\n".join(failures))


def find_files(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[Path, Path]:
    """Locate (or download) the image and label files of an official split.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: the official split, ``"train"`` (60000 images) or ``"test"`` (10000).
        root: a folder looked in first (and its subfolder ``name``).
        download: whether to download the files into the cache as a last resort.

    Returns:
        The paths of the image file and the label file, from the first place in the
        lookup order (see the module docstring) that holds both.

    Raises:
        DatasetNotFoundError: listing the places looked, the download attempts and the fixes.

    Example:
        >>> images, labels = find_files("fashion-mnist", "test")  # doctest: +SKIP
        >>> images.name  # doctest: +SKIP
        't10k-images-idx3-ubyte.gz'
    """
    source = _source(name)
    check_split(split, tuple(_OFFICIAL))
    stems = _OFFICIAL[split]
    places = _local_places(name, root)
    for _, folder in places:
        found = _in_folder(folder, stems)
        if found is not None:
            return found[0], found[1]

    attempts = "  (download disabled: download=False)"
    if download:
        try:
            paths = []
            for stem in stems:
                cached = cache_dir(name) / f"{stem}.gz"  # one of the pair may be there already
                if not cached.is_file():
                    cached = _download(cached.name, source.mirrors, source.md5[cached.name], cached.parent)
                paths.append(cached)
            return paths[0], paths[1]
        except OSError as error:
            attempts = "\n".join(f"  - {line}" for line in str(error).splitlines())

    def message(root_label: str, root_fix: str) -> str:
        unset = [] if root is not None else [(root_label, "not given")]
        unset += [] if os.environ.get(DATA_ENV) else [(f"${DATA_ENV}", "not set")]
        listed = [(root_label if label == ROOT_LABEL else label, where) for label, where in places]
        looked = "\n".join(f"  - {label}: {where}" for label, where in [*unset, *listed])
        fixes = [f"pass {root_fix} holding the files", f"set {DATA_ENV}=FOLDER"]
        if source.system_hint:
            fixes.insert(0, source.system_hint)
        return (
            f"{name} ({split} split) not found: looked for "
            f"{' and '.join(f'{s}[.gz]' for s in stems)} in\n{looked}\nand the download "
            f"failed:\n{attempts}\nTo fix it: {'; or '.join(fixes)}."
        )

    raise DatasetNotFoundError(message(ROOT_LABEL, "root=FOLDER"), message("--root", "--root FOLDER"))


def _read_checked(
    name: str, split: str, root: str | os.PathLike[str] | None, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    image_path, label_path = find_files(name, split, root=root, download=download)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise CorruptFileError(
            f"{image_path}: expected uint8 images of shape (N, 28, 28), "
            f"found {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise CorruptFileError(
            f"{label_path}: expected {images.shape[0]} labels (one per image in "
            f"{image_path.name}), found shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise CorruptFileError(
            f"{label_path}: expected labels 0..{NUM_CLASSES - 1}, "
            f"found values in [{labels.min()}, {labels.max()}]"
        )
    return images, labels, image_path


def read_official(
    name: str, split: str = "train", root: str | os.PathLike[str] | None = None, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read an official split as NumPy arrays, checked for shape and consistency.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: the official split, ``"train"`` (60000 images) or ``"test"`` (10000).
        root: a folder looked in first; see :func:`find_files`.
        download: whether to download the files as a last resort.

    Returns:
        ``(images, labels)``: ``uint8`` arrays of shapes ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        CorruptFileError: a file whose content is not what the data set needs.
        DatasetNotFoundError: as :func:`find_files`.

    Example:
        >>> images, labels = read_official("fashion-mnist", "test")  # doctest: +SKIP
        >>> images.shape, labels.shape  # doctest: +SKIP
        ((10000, 28, 28), (10000,))
    """
    images, labels, _ = _read_checked(name, split, root, download)
    return images, labels


def _load(name: str, split: str, root: str | os.PathLike[str] | None, seed: int, download: bool) -> Dataset:
    check_split(split)
    check_seed(seed)
    official = "test" if split == "test" else "train"
    images, labels, image_path = _read_checked(name, official, root, download)
    if split != "test":
        num_val = images.shape[0] // 6
        train, val = split_indices(images.shape[0], [images.shape[0] - num_val, num_val], seed)
        keep = train if split == "train" else val
        images, labels = images[keep], labels[keep]
    return image_dataset(name, split, images, labels, LEVELS, str(image_path))


def fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, seed: int = 0, download: bool = True
) -> Dataset:
    """Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017, arXiv:1708.07747).

    28x28 greyscale images of clothes in 10 classes, 256 grey levels.

    Args:
        split: ``"train"`` (50000 of the official training images), ``"val"`` (the other
            10000, chosen by ``seed``) or ``"test"`` (the official 10000 test images).
        root: a folder looked in first; see the module docstring for the lookup order.
        seed: the seed of the train/val permutation (``"test"`` does not depend on it).
        download: whether to download the files as a last resort.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 1, 28, 28)`` holding levels
        ``0..255`` as ``float32``, ``y`` the labels and ``levels=256``.

    Example:
        >>> data = fashion_mnist("test")  # doctest: +SKIP
        >>> data.x.shape, data.levels  # doctest: +SKIP
        (torch.Size([10000, 1, 28, 28]), 256)
    """
    return _load("fashion-mnist", split, root, seed, download)


def mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None, seed: int = 0, download: bool = True
) -> Dataset:
    """MNIST handwritten digits (LeCun, Bottou, Bengio and Haffner, 1998).

    28x28 greyscale images of digits in 10 classes, 256 grey levels. Arguments, splits and
    the returned :class:`Dataset` are as for :func:`fashion_mnist`; there is no system
    location to look in (Debian packages no MNIST).

    Example:
        With a folder of files (here three blank images in place of the real ones):

        >>> import tempfile, numpy as np
        >>> from pyro_genext.data import write_idx
        >>> root = tempfile.mkdtemp()
        >>> write_idx(f"{root}/t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
        >>> write_idx(f"{root}/t10k-labels-idx1-ubyte.gz", np.array([7, 2, 1], np.uint8))
        >>> data = mnist("test", root=root)
        >>> data.x.shape, data.y.tolist()
        (torch.Size([3, 1, 28, 28]), [7, 2, 1])
    """
    return _load("mnist", split, root, seed, download)
