"""Offline datasets: splits, stable ids, the idx reader and the missing-dataset error."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch

import kmem
from kmem.cli import main
from kmem.datasets import splits as data
from kmem.datasets.idx import read_idx


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An idx file's bytes, written by hand from the format's definition."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def fake_fashion_mnist(root, n_train=5, n_test=3):
    """Tiny Fashion-MNIST files (gzip idx) in ``root``."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels, 0x08)))


def check_split(split, n, shape, name):
    assert len(split) == n and split.name == name
    assert split.images.shape == (n, *shape) and split.images.dtype == torch.float32
    assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
    assert split.ids.shape == (n,) and split.ids.dtype == torch.int64
    assert split.images.min() >= 0.0 and split.images.max() <= 1.0


def check_ids(ds):
    """Train ids are 0..n_train-1 (the row in train), test ids follow: unique across splits."""
    n_train, n_test = len(ds.train), len(ds.test)
    assert torch.equal(ds.train.ids, torch.arange(n_train))
    assert torch.equal(ds.test.ids, torch.arange(n_train, n_train + n_test))


def test_digits():
    ds = kmem.load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.classes[3] == "3"
    check_split(ds.train, 1437, (1, 8, 8), "digits/train")
    check_split(ds.test, 360, (1, 8, 8), "digits/test")
    check_ids(ds)
    again = kmem.load_dataset("digits")  # stable: the same ids name the same samples
    assert torch.equal(again.test.ids, ds.test.ids) and torch.equal(again.test.images, ds.test.images)
    assert set(ds.test.labels.tolist()) == set(range(10))


@pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)"
)
def test_fashion_mnist_installed():
    ds = kmem.load_dataset("fashion-mnist")
    assert ds.num_classes == 10 and ds.classes[9] == "Ankle boot"
    check_split(ds.train, 60000, (1, 28, 28), "fashion-mnist/train")
    check_split(ds.test, 10000, (1, 28, 28), "fashion-mnist/test")
    check_ids(ds)
    assert torch.equal(torch.bincount(ds.test.labels), torch.full((10,), 1000))  # the published balance


def test_fashion_mnist_from_folder(tmp_path):
    fake_fashion_mnist(tmp_path)
    ds = kmem.load_dataset("fashion-mnist", root=tmp_path)
    check_split(ds.train, 5, (1, 28, 28), "fashion-mnist/train")
    check_ids(ds)
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(raw).float() / 255)


def test_split_indexing_keeps_ids():
    train = kmem.load_dataset("digits").train
    part = train[torch.tensor([5, 2])]
    assert part.ids.tolist() == [5, 2] and part.name == "digits/train"
    assert torch.equal(part.images[1], train.images[2])
    assert train[10:13].ids.tolist() == [10, 11, 12]
    assert train[7].ids.tolist() == [7] and train[7].images.shape == (1, 1, 8, 8)
    assert len(train[train.labels == 0]) == int((train.labels == 0).sum())


def test_split_checks_dtypes():
    with pytest.raises(ValueError, match="labels must be int64"):
        data.Split(torch.zeros(2, 1, 4, 4), torch.zeros(2), torch.arange(2), "x/train")
    with pytest.raises(ValueError, match="images must be float32"):
        data.Split(torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.int64), torch.arange(2), "x/train")


@pytest.mark.parametrize(
    ("array", "code"),
    [
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-3, 7], dtype=np.int16), 0x0B),
        (np.array([[1.5, -2.0]], dtype=np.float32), 0x0D),
    ],
)
def test_read_idx(tmp_path, array, code):
    (tmp_path / "a.idx").write_bytes(idx_bytes(array, code))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(array, code)))
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == array.dtype and out.dtype.isnative
        np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "bad header empty"),
        (b"\x01\x00\x08\x01", "bad header"),
        (b"\x00\x00\x07\x01", "bad header"),
        (b"\x00\x00\x08\x03\x00\x00", "header cut short"),
        (idx_bytes(np.zeros((2, 3), np.uint8), 0x08)[:-1], r"needs 6 data bytes, found 5"),
    ],
)
def test_read_idx_corrupt(tmp_path, content, match):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_bad_gzip(tmp_path):
    path = tmp_path / "bad.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8), 0x08))[:-8])  # truncated
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(path)


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(kmem.DatasetNotInstalled, match=r"apt-get install dataset-fashion-mnist") as err:
        kmem.load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path) in str(err.value) and "train-images-idx3-ubyte.gz" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_mismatched_files(tmp_path):
    fake_fashion_mnist(tmp_path)
    shutil.copy(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(ValueError, match="do not match"):
        kmem.load_dataset("fashion-mnist", root=tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'; known: digits, fashion-mnist"):
        kmem.load_dataset("cifar10")
    with pytest.raises(ValueError, match="takes no root"):
        kmem.load_dataset("digits", root="/tmp")


def test_cli_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["features", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("kmem: Fashion-MNIST is not installed") and "apt-get install" in err
