"""The frozen key encoder and its feature cache, on small slices of digits at 32x32."""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import matplotlib.image
import pytest
import torch
import torch.nn.functional as F

import kmem
from kmem.cli import main
from kmem.datasets import features

RES = 32  # small and fast; the cache and encoder logic do not depend on it


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test writes to the user's feature cache."""
    monkeypatch.setenv("KMEM_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture(scope="module")
def digits():
    return kmem.load_dataset("digits")


@pytest.fixture(scope="module")
def encoder():
    return kmem.KeyEncoder(RES)


def test_shape_and_dtype(encoder, digits):
    out = encoder(digits.train.images[:8])
    assert out.shape == (8, 1280) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_frozen_and_deterministic(encoder, digits):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    images = digits.train.images[:4].clone().requires_grad_(True)
    out = encoder(images)
    assert not out.requires_grad
    assert torch.equal(out, encoder(images)) and torch.equal(out[:2], encoder(images[:2]))


def test_grey_is_three_equal_channels(encoder, digits):
    grey = digits.train.images[:3]
    assert torch.equal(encoder(grey), encoder(grey.expand(-1, 3, -1, -1)))


def test_pretrained_on_a_photo():
    """Weights and input scaling are ImageNet-right: Grace Hopper in uniform is class 652."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = torch.from_numpy(matplotlib.image.imread(f, format="jpg").copy()).permute(2, 0, 1)
    encoder = kmem.KeyEncoder(224)
    logits = encoder.net._fc(encoder(photo[None].float() / 255))
    assert logits.argmax().item() == 652  # "military uniform"


def test_features_tell_digits_apart(digits):
    """Nearest-neighbour accuracy of frozen features is far above chance (10%)."""
    train, test = kmem.encode(digits.train[:300], RES), kmem.encode(digits.test[:100], RES)
    nearest = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).argmax(1)
    assert (digits.train.labels[nearest] == digits.test.labels[:100]).float().mean() > 0.6


def test_encode_images_equals_split(digits):
    split = digits.train[:6]
    assert torch.equal(kmem.encode(split.images, RES, batch_size=4), kmem.encode(split, RES, cache=False))
    with pytest.raises(ValueError, match="only a Split can be cached"):
        kmem.encode(split.images, RES, cache=True)
    with pytest.raises(TypeError, match="Split or an image tensor"):
        kmem.encode(split.images.numpy(), RES)


def test_features_can_feed_a_trained_layer(digits, tmp_path):
    """encode() never returns inference-mode tensors, which autograd refuses to save."""
    layer = torch.nn.Linear(1280, 10)
    for feats in (
        kmem.encode(digits.train[:4], RES, cache=False),
        kmem.encode(digits.train[:4], RES, cache_dir=tmp_path),
    ):
        layer(feats).sum().backward()


def test_cache_hit_skips_the_encoder(digits, tmp_path, monkeypatch):
    split = digits.train[:10]
    first = kmem.encode(split, RES, cache_dir=tmp_path)
    path = kmem.cache_path(split, RES, tmp_path)
    assert path.is_file() and list(tmp_path.iterdir()) == [path]  # no temp file left behind

    def no_encoder(resolution):
        raise AssertionError("the encoder ran on a cache hit")

    monkeypatch.setattr(features, "_encoder", no_encoder)
    assert torch.equal(kmem.encode(split, RES, cache_dir=tmp_path), first)
    monkeypatch.setenv("KMEM_CACHE", str(tmp_path))  # the env var names the same folder
    assert torch.equal(kmem.encode(split, RES), first)


def test_cache_key(digits, tmp_path, monkeypatch):
    split = digits.train[:10]
    path = kmem.cache_path(split, RES, tmp_path)
    assert path.parent == tmp_path and "digits-train" in path.name and f"{RES}px" in path.name
    assert kmem.cache_path(split, 48, tmp_path) != path
    assert kmem.cache_path(digits.train[1:11], RES, tmp_path) != path
    assert kmem.cache_path(digits.test[:10], RES, tmp_path) != path
    assert kmem.cache_path(kmem.load_dataset("digits").train[:10], RES, tmp_path) == path
    monkeypatch.setenv("KMEM_CACHE", str(tmp_path / "env"))
    assert kmem.cache_path(split, RES).parent == tmp_path / "env"
    monkeypatch.delenv("KMEM_CACHE")
    assert kmem.cache_path(split, RES).parent.parts[-3:] == (".cache", "kmem", "features")


def test_unreadable_cache_is_recomputed(digits, tmp_path):
    split = digits.train[:5]
    path = kmem.cache_path(split, RES, tmp_path)
    path.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="recomputing features"):
        feats = kmem.encode(split, RES, cache_dir=tmp_path)
    assert torch.equal(feats, kmem.encode(split, RES, cache=False))
    assert torch.equal(kmem.encode(split, RES, cache_dir=tmp_path), feats)  # rewritten, now read


def test_bad_input(encoder):
    with pytest.raises(ValueError, match=r"\[n, 1 or 3, H, W\]"):
        encoder(torch.zeros(2, 2, 8, 8))
    with pytest.raises(TypeError, match="floating tensor"):
        encoder(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="resolution must be a positive int"):
        kmem.KeyEncoder(0)


def test_cli_features_fills_the_cache(tmp_path, capsys):
    args = ["features", "digits", "--resolution", "16", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["digits/train", "digits/test"]
    assert "1437 x 1280 features (efficientnet-lite0, 16 px)" in lines[0]
    assert sorted(tmp_path.iterdir()) == sorted(Path(line.split(" -> ")[1]) for line in lines)
