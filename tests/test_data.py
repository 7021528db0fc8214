"""Tests of pyro_genext.data: the IDX reader, the (Fashion-)MNIST lookup and download, the
digits and toy splits, and the front door. Nothing here touches the network."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_genext import data
from pyro_genext.data import (
    DATASETS,
    CorruptFileError,
    Dataset,
    DatasetNotFoundError,
    load_dataset,
    read_idx,
    write_idx,
)
from pyro_genext.data.dataset import check_levels, split_indices
from pyro_genext.data.toy import TOY_DENSITIES

# The functions digits() and mnist() shadow their modules as package attributes (as in
# Pyro's transforms), so the modules are fetched by their full names.
digits_module = importlib.import_module("pyro_genext.data.digits")
mnist_module = importlib.import_module("pyro_genext.data.mnist")
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
REAL_SOURCES = dict(mnist_module._SOURCES)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, no user data: an empty cache, no $PYRO_GENEXT_DATA, a fake system folder."""

    def no_network(url: str, dest: Path) -> None:
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(mnist_module, "_fetch", no_network)
    monkeypatch.delenv("PYRO_GENEXT_DATA", raising=False)
    monkeypatch.setenv("PYRO_GENEXT_CACHE", str(tmp_path / "cache"))
    for name, source in mnist_module._SOURCES.items():
        system = (tmp_path / "system" / name,) if source.system_dirs else ()
        monkeypatch.setitem(mnist_module._SOURCES, name, dataclasses.replace(source, system_dirs=system))
    return tmp_path


def fake_split(folder: Path, split: str = "test", n: int = 3, first: int = 0, gz: bool = True) -> None:
    """Write ``n`` fake 28x28 images whose every pixel is ``first + i``, labelled ``i % 10``."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    ext = ".gz" if gz else ""
    images = (first + np.arange(n, dtype=np.uint8))[:, None, None] * np.ones((1, 28, 28), np.uint8)
    write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


def first_pixels(dataset: Dataset) -> list[int]:
    return dataset.x[:, 0, 0, 0].to(torch.int64).tolist()


# --------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "uint8":
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_header_layout(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    write_idx(path, np.array([7, 2, 1], dtype=np.uint8))
    assert path.read_bytes() == bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 2, 1])


def test_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "no-suffix"
    with gzip.open(path, "wb") as out:
        out.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 2, 5, 6]))
    assert read_idx(path).tolist() == [5, 6]


HEADER = bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3])  # uint8, shape (2, 3)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\x01\x00" + HEADER[2:] + bytes(6), "magic"),
        (HEADER[:2] + b"\x07" + HEADER[3:] + bytes(6), "type code"),
        (HEADER + bytes(5), "truncated"),
        (HEADER + bytes(8), "2 trailing bytes"),
        (HEADER[:6], "dimension sizes"),
        (b"\x00\x00", "header"),
    ],
    ids=["magic", "dtype", "truncated", "trailing", "short-sizes", "short-header"],
)
@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["raw", "gzip"])
def test_idx_corrupt(tmp_path: Path, content: bytes, expected: str, suffix: str) -> None:
    path = tmp_path / f"bad-idx2-ubyte{suffix}"
    path.write_bytes(gzip.compress(content) if suffix else content)
    with pytest.raises(CorruptFileError, match=expected) as info:
        read_idx(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)


def test_idx_broken_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(HEADER + bytes(6))[:-12])
    with pytest.raises(CorruptFileError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_write_idx_rejects_unsupported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.array(3, dtype=np.uint8))


# ---------------------------------------------------------------------------- front door


def test_names_and_unknown_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DATASETS == (
        "digits", "fashion-mnist", "mnist", "moons", "8gaussians", "checkerboard", "rings", "spirals"
    )  # fmt: skip

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded before validating the arguments")

    monkeypatch.setattr(mnist_module, "find_files", must_not_load)
    monkeypatch.setattr(digits_module, "_load_digits", must_not_load)
    with pytest.raises(ValueError, match="'digits'.*'spirals'"):
        load_dataset("cifar10")
    for name in ("digits", "mnist", "fashion-mnist", "moons"):
        with pytest.raises(ValueError, match="'train', 'val', 'test'"):
            load_dataset(name, split="validation")
    with pytest.raises(ValueError, match="seed"):
        load_dataset("mnist", seed=-1)
    with pytest.raises(ValueError, match="num_points"):
        load_dataset("moons", num_points=0)
    with pytest.raises(ValueError, match="'train', 'val', 'test'"):
        data.fashion_mnist("dev")


def test_dataset_record() -> None:
    record = Dataset("toy", torch.zeros(4, 2), None, None)
    assert record.event_shape == torch.Size([2]) and len(record) == 4
    with pytest.raises(ValueError, match="float32"):
        Dataset("toy", torch.zeros(4, 2, dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="labels"):
        Dataset("toy", torch.zeros(4, 2), torch.zeros(3), None)


def test_check_levels_names_the_source() -> None:
    check_levels(np.array([0.0, 16.0]), 17, "here")
    for bad in (np.array([0.0, np.nan]), np.array([0.0, 17.0]), np.array([-1, 3]), np.array([0.5])):
        with pytest.raises(ValueError, match="^somefile: expected"):
            check_levels(bad, 17, "somefile")


# ------------------------------------------------------------------------------- digits


def test_split_indices_partition() -> None:
    blocks = split_indices(1797, [1438, 179, 180], seed=0)
    assert [len(b) for b in blocks] == [1438, 179, 180]
    assert sorted(np.concatenate(blocks).tolist()) == list(range(1797))
    again = split_indices(1797, [1438, 179, 180], seed=0)
    other = split_indices(1797, [1438, 179, 180], seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(blocks, again))
    assert not np.array_equal(blocks[2], other[2])


def test_digits_splits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    images = sklearn_datasets.load_digits().images
    splits = {split: load_dataset("digits", split) for split in ("train", "val", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 1438, "val": 179, "test": 180}
    for split, block in zip(splits, split_indices(1797, [1438, 179, 180], seed=0)):
        d = splits[split]
        assert d.x.shape == (len(block), 1, 8, 8) and d.x.dtype == torch.float32
        assert d.levels == 17 and d.event_shape == (1, 8, 8) and d.y is not None
        assert 0 <= d.x.min() and d.x.max() <= 16 and torch.equal(d.x, d.x.round())
        np.testing.assert_array_equal(d.x[:, 0].numpy(), images[block])
    assert torch.equal(load_dataset("digits", "test").x, splits["test"].x)
    assert not torch.equal(load_dataset("digits", "test", seed=1).x, splits["test"].x)
    assert load_dataset("digits", num_points=10).x.shape == (10, 1, 8, 8)


def test_digits_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bunch:
        images = np.full((1797, 8, 8), np.nan)
        target = np.zeros(1797, dtype=np.int64)

    monkeypatch.setattr(digits_module, "_load_digits", Bunch)
    with pytest.raises(ValueError, match="load_digits.*NaN"):
        data.digits("train")


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install"):
        data.digits("train")


# --------------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_density(name: str) -> None:
    density = TOY_DENSITIES[name]
    x = density(3000, seed=5)
    assert x.shape == (3000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, density(3000, seed=5))
    assert not torch.equal(x, density(3000, seed=6))
    assert x.mean(0).abs().max() < 0.15
    assert ((0.6 < x.std(0)) & (x.std(0) < 1.4)).all()
    assert density(0, seed=0).shape == (0, 2)


@pytest.mark.parametrize("name", list(TOY_DENSITIES))
def test_toy_splits(name: str) -> None:
    splits = {split: load_dataset(name, split) for split in ("train", "val", "test")}
    assert [len(d) for d in splits.values()] == [10000, 2000, 2000]
    assert all(d.levels is None and d.y is None and d.event_shape == (2,) for d in splits.values())
    assert torch.equal(splits["train"].x, TOY_DENSITIES[name](10000, seed=0))
    assert not torch.equal(splits["val"].x, splits["test"].x)
    small = load_dataset(name, "val", seed=3, num_points=50)
    assert torch.equal(small.x, load_dataset(name, "val", seed=3, num_points=50).x)
    assert small.x.shape == (50, 2)


def test_toy_bad_arguments() -> None:
    with pytest.raises(ValueError, match="number of points"):
        data.moons(-1)
    with pytest.raises(ValueError, match="seed"):
        data.rings(3, seed=-2)


# --------------------------------------------------------------------- (Fashion-)MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_root_folder(offline: Path, gz: bool) -> None:
    fake_split(offline / "mine", gz=gz)
    test = data.mnist("test", root=offline / "mine")
    assert test.x.shape == (3, 1, 28, 28) and test.levels == 256 and test.split == "test"
    assert first_pixels(test) == [0, 1, 2] and test.y is not None and test.y.tolist() == [0, 1, 2]
    # The subfolder named after the data set counts too.
    fake_split(offline / "all" / "fashion-mnist")
    assert len(load_dataset("fashion-mnist", "test", root=offline / "all")) == 3


def test_lookup_order(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_split(offline / "root", first=10)
    fake_split(offline / "env" / "fashion-mnist", first=20)
    fake_split(offline / "system" / "fashion-mnist", first=30)
    fake_split(offline / "cache" / "fashion-mnist", first=40)
    monkeypatch.setenv("PYRO_GENEXT_DATA", str(offline / "env"))
    assert first_pixels(data.fashion_mnist("test", root=offline / "root"))[0] == 10
    assert first_pixels(data.fashion_mnist("test", root=offline / "nothing-here"))[0] == 20
    assert first_pixels(data.fashion_mnist("test"))[0] == 20
    monkeypatch.delenv("PYRO_GENEXT_DATA")
    assert first_pixels(data.fashion_mnist("test"))[0] == 30
    # MNIST has no system location: the cache comes next, then the download.
    fake_split(offline / "cache" / "mnist", first=50)
    assert first_pixels(data.mnist("test"))[0] == 50
    # A folder holding only half of a split does not count.
    (offline / "system" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert first_pixels(data.fashion_mnist("test"))[0] == 40


def test_env_folder(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_split(offline / "flat", first=7)
    monkeypatch.setenv("PYRO_GENEXT_DATA", str(offline / "flat"))
    assert first_pixels(load_dataset("mnist", "test")) == [7, 8, 9]


def test_train_val_split(offline: Path) -> None:
    fake_split(offline / "root", split="train", n=12)
    train = data.mnist("train", root=offline / "root")
    val = data.mnist("val", root=offline / "root")
    assert (len(train), len(val)) == (10, 2)
    assert sorted(first_pixels(train) + first_pixels(val)) == list(range(12))
    assert torch.equal(data.mnist("val", root=offline / "root").x, val.x)
    assert not torch.equal(data.mnist("val", root=offline / "root", seed=1).x, val.x)
    assert len(load_dataset("mnist", "train", root=offline / "root", num_points=4)) == 4
    with pytest.raises(ValueError, match="more than the 2 images"):
        load_dataset("mnist", "val", root=offline / "root", num_points=3)


def test_wrong_content_names_the_file(offline: Path) -> None:
    folder = offline / "root"
    fake_split(folder)
    images = folder / "t10k-images-idx3-ubyte.gz"
    write_idx(images, np.zeros((3, 27, 28), np.uint8))
    with pytest.raises(CorruptFileError, match=f"{images}: expected uint8 images of shape"):
        data.mnist("test", root=folder)
    write_idx(images, np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(CorruptFileError, match="labels-idx1-ubyte.gz: expected 4 labels"):
        data.mnist("test", root=folder)
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(CorruptFileError, match=str(images)):
        data.mnist("test", root=folder)


def gz_split(folder: Path, split: str = "test") -> dict[str, bytes]:
    """Fake official .gz files: their bytes by file name."""
    fake_split(folder, split)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def serve(files: dict[str, bytes], calls: list[str]):  # type: ignore[no-untyped-def]
    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        name = url.rsplit("/", 1)[1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)  # type: ignore[arg-type]
        Path(dest).write_bytes(files[name])

    return fetch


def test_download_success(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = gz_split(offline / "upstream")
    for name, content in files.items():
        monkeypatch.setitem(mnist_module._SOURCES["mnist"].md5, name, hashlib.md5(content).hexdigest())
    calls: list[str] = []
    monkeypatch.setattr(mnist_module, "_fetch", serve(files, calls))
    test = data.mnist("test")
    assert first_pixels(test) == [0, 1, 2]
    cache = offline / "cache" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)
    assert all((cache / name).read_bytes() == content for name, content in files.items())
    assert len(calls) == 2 and calls[0].startswith(mnist_module._SOURCES["mnist"].mirrors[0])
    data.mnist("test")  # now from the cache
    assert len(calls) == 2
    (cache / "t10k-labels-idx1-ubyte.gz").unlink()
    data.mnist("test")  # only the missing file is fetched
    assert len(calls) == 3 and calls[-1].endswith("t10k-labels-idx1-ubyte.gz")


def test_download_checksum_mismatch(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = gz_split(offline / "upstream")  # their MD5s are not the published ones
    calls: list[str] = []
    monkeypatch.setattr(mnist_module, "_fetch", serve(files, calls))
    with pytest.raises(DatasetNotFoundError, match="expected MD5 9fb629c4189551a2d022fa330f9573f3"):
        data.mnist("test")
    assert len(calls) == len(mnist_module._SOURCES["mnist"].mirrors)  # every mirror tried
    assert list((offline / "cache" / "mnist").iterdir()) == []  # no file, no partial file


def test_download_falls_back_to_next_mirror(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = gz_split(offline / "upstream")
    for name, content in files.items():
        monkeypatch.setitem(
            mnist_module._SOURCES["fashion-mnist"].md5, name, hashlib.md5(content).hexdigest()
        )
    first, second = mnist_module._SOURCES["fashion-mnist"].mirrors[:2]
    calls: list[str] = []
    good = serve(files, calls)

    def flaky(url: str, dest: Path) -> None:
        if url.startswith(first):
            calls.append(url)
            Path(dest).write_bytes(b"half a fi")
            raise urllib.error.URLError("connection reset")
        good(url, dest)

    monkeypatch.setattr(mnist_module, "_fetch", flaky)
    assert len(data.fashion_mnist("test")) == 3
    assert [url.startswith(second) for url in calls] == [False, True, False, True]
    assert sorted(p.name for p in (offline / "cache" / "fashion-mnist").iterdir()) == sorted(files)


def test_unreachable_gives_clear_error(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_GENEXT_DATA", str(offline / "env"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", "train", root=offline / "root")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    for expected in [
        "fashion-mnist (train split) not found",
        "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]",
        f"root= argument: {offline / 'root'}",
        f"$PYRO_GENEXT_DATA: {offline / 'env' / 'fashion-mnist'}",
        f"system location: {offline / 'system' / 'fashion-mnist'}",
        f"download cache: {offline / 'cache' / 'fashion-mnist'}",
        "fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz: ",
        "network disabled in tests",
        "apt-get install dataset-fashion-mnist",
        "pass root=FOLDER",
        "set PYRO_GENEXT_DATA=FOLDER",
    ]:
        assert expected in message
    assert not (offline / "cache" / "fashion-mnist").exists() or not any(
        (offline / "cache" / "fashion-mnist").iterdir()
    )

    monkeypatch.delenv("PYRO_GENEXT_DATA")
    with pytest.raises(DatasetNotFoundError) as info:
        data.mnist("test", download=False)
    message = str(info.value)
    assert "root= argument: not given" in message and "$PYRO_GENEXT_DATA: not set" in message
    assert "download disabled" in message and "apt-get" not in message


@pytest.mark.skipif(
    not all(
        (DEBIAN_FASHION / f"t10k-{k}-idx{d}-ubyte.gz").is_file() for k, d in [("images", 3), ("labels", 1)]
    ),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)
def test_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real system location; still no network, no $PYRO_GENEXT_DATA, an empty cache.
    monkeypatch.setitem(mnist_module._SOURCES, "fashion-mnist", REAL_SOURCES["fashion-mnist"])
    test = data.fashion_mnist("test", download=False)
    assert test.x.shape == (10000, 1, 28, 28) and test.x.dtype == torch.float32
    assert test.levels == 256 and test.x.min() == 0 and test.x.max() == 255
    assert test.y is not None and sorted(test.y.unique().tolist()) == list(range(10))
    assert torch.bincount(test.y).tolist() == [1000] * 10
