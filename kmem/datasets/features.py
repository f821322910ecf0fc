"""Key-encoder features of a dataset split, computed once and cached on disk.

A split's features live in one safetensors file (format ``kmem.features``: tensors
``features`` float32 ``[n, 1280]`` and ``ids`` int64 ``[n]``) under the cache folder:
the ``cache_dir`` argument, else ``$KMEM_CACHE``, else ``~/.cache/kmem/features``. The
file name holds the split's name, the encoder's name, the resolution and a hash of the
split's ids and images, so a different slice, resolution or dataset version never
reads another's features. Files are written atomically; an unreadable one is recomputed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import snapshot
from .encoder import DIM, NAME, KeyEncoder
from .splits import Split

FORMAT = "kmem.features"
CACHE_ENV = "KMEM_CACHE"


def _cache_root(path: str | Path | None) -> Path:
    """The feature cache folder: ``path``, else ``$KMEM_CACHE``, else ``~/.cache/kmem/features``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kmem" / "features")


def cache_path(split: Split, resolution: int = 64, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`encode` keeps ``split``'s features at ``resolution``."""
    digest = hashlib.blake2b(digest_size=8)
    for t in (split.ids, split.images):
        digest.update(t.contiguous().numpy().tobytes())
    stem = f"{split.name.replace('/', '-')}-{NAME}-{resolution}px-{digest.hexdigest()}"
    return _cache_root(cache_dir) / f"{stem}.safetensors"


@functools.lru_cache(maxsize=2)
def _encoder(resolution: int) -> KeyEncoder:
    # Frozen, so one instance per resolution can serve every call.
    return KeyEncoder(resolution)


def encode(
    data: Split | torch.Tensor,
    resolution: int = 64,
    *,
    cache: bool | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    progress: bool | None = None,
) -> torch.Tensor:
    """Frozen EfficientNet-Lite0 features of a split or of images: float32 ``[n, 1280]``.

    Args:
        data: a :class:`~kmem.datasets.splits.Split`, or images float ``[n, 1 or 3, H, W]`` in ``[0, 1]``.
        resolution: side the images are resized to before encoding.
        cache: read and write the on-disk cache (see the module docstring). ``None``
            (default): yes for a split, no for raw images, which have no name or ids to
            key a file; ``True`` with raw images is an error.
        cache_dir: the cache folder (default ``$KMEM_CACHE`` or ``~/.cache/kmem/features``).
        batch_size: images per forward pass.
        progress: show a progress bar (default: when writing to a terminal).

    The result is an ordinary tensor (never an inference-mode one), so it can feed
    layers that are trained.
    """
    if isinstance(data, Split):
        images, use_cache, desc = data.images, cache is not False, f"encoding {data.name}"
    elif isinstance(data, torch.Tensor):
        if cache:
            raise ValueError("only a Split can be cached: its name and ids key the cache file")
        images, use_cache, desc = data, False, "encoding"
    else:
        raise TypeError(f"data must be a Split or an image tensor, got {type(data).__name__}")
    if not use_cache:
        return _extract(images, resolution, batch_size, desc, progress)
    path = cache_path(data, resolution, cache_dir)
    features = _read(path, data)
    if features is None:
        features = _extract(images, resolution, batch_size, desc, progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = {"encoder": NAME, "resolution": resolution, "split": data.name}
        snapshot.write(path, {"features": features, "ids": data.ids}, config, fmt=FORMAT)
    return features


def _read(path: Path, split: Split) -> torch.Tensor | None:
    """Cached features of ``split`` at ``path``; None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        tensors, _ = snapshot.read(path, ("features", "ids"), fmt=FORMAT)
    except ValueError as err:
        warnings.warn(f"recomputing features: {err}", stacklevel=3)
        return None
    if tensors["features"].shape != (len(split), DIM) or not torch.equal(tensors["ids"], split.ids):
        warnings.warn(f"recomputing features: {path} does not hold this split's", stacklevel=3)
        return None
    return tensors["features"]


def _extract(
    images: torch.Tensor, resolution: int, batch_size: int, desc: str, progress: bool | None
) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = _encoder(resolution)
    out = torch.empty(images.shape[0], DIM)  # allocated outside inference mode: see encode()
    with tqdm(
        total=len(out), desc=desc, unit="img", disable=None if progress is None else not progress
    ) as bar:
        for start in range(0, len(out), batch_size):
            with torch.inference_mode():
                out[start : start + batch_size] = encoder(images[start : start + batch_size])
            bar.update(min(batch_size, len(out) - start))
    return out
