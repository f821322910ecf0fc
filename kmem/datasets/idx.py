"""Reader for the idx format of (Fashion-)MNIST: a small header, then a big-endian array.

Layout: two zero bytes, one dtype code byte, one byte ``ndim``, ``ndim`` big-endian
uint32 dimension sizes, then the array's bytes in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

# dtype code -> big-endian numpy dtype (from the format's definition)
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (gzip-compressed when its name ends in ``.gz``).

    Returns the array in native byte order with the header's shape and dtype
    (uint8 ``[n, rows, cols]`` for MNIST images, uint8 ``[n]`` for labels).
    Raises ``FileNotFoundError`` if there is no file and ``ValueError``, naming the
    file, if it is not a complete idx file.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path} is not an idx file (bad header {raw[:4].hex() or 'empty'})")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{path}: idx header cut short ({len(raw)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - start != expected:
        raise ValueError(
            f"{path}: idx shape {list(shape)} needs {expected} data bytes, found {len(raw) - start}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))
