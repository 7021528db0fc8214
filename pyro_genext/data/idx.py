"""Reading and writing IDX files, the format of the MNIST family of data sets.

An IDX file is a 4-byte magic number, ``0x00 0x00``, a type byte and a byte giving the
number of dimensions ``d``; then ``d`` big-endian ``int32`` sizes; then the values,
big-endian, in C order. The files are commonly gzip-compressed; :func:`read_idx` tells
the two apart by the gzip magic bytes, not by the file name.

Reference: Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten
digits" (1998), section "File formats for the MNIST database".
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["CorruptFileError", "read_idx", "write_idx"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type byte -> big-endian numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.newbyteorder("="): code for code, dtype in _DTYPES.items()}


class CorruptFileError(ValueError):
    """A data file that does not hold what its format promises.

    The message names the file, what was expected and what was found.
    """


def _fail(path: str | os.PathLike[str], expected: str, found: str) -> CorruptFileError:
    return CorruptFileError(f"{os.fspath(path)}: expected {expected}, found {found}")


def _read_exactly(stream: BinaryIO, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``stream``; return the number of bytes read (short at EOF)."""
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:])  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled


def _read_stream(stream: BinaryIO, path: str | os.PathLike[str]) -> np.ndarray:
    header = stream.read(4)
    if len(header) < 4:
        raise _fail(path, "a 4-byte IDX header", f"{len(header)} bytes in the whole file")
    zero, code, ndim = struct.unpack(">HBB", header)
    if zero != 0:
        raise _fail(path, "an IDX magic number starting 0x0000", f"0x{header.hex()}")
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise _fail(path, f"an IDX type code in ({known})", f"0x{code:02X}")
    if ndim == 0:
        raise _fail(path, "at least one dimension", "0 in the header")
    raw_sizes = stream.read(4 * ndim)
    if len(raw_sizes) < 4 * ndim:
        raise _fail(path, f"{ndim} dimension sizes ({4 * ndim} bytes)", f"{len(raw_sizes)} bytes")
    shape = struct.unpack(f">{ndim}i", raw_sizes)
    if any(size < 0 for size in shape):
        raise _fail(path, "non-negative dimension sizes", f"{shape}")

    dtype = _DTYPES[code]
    array = np.empty(shape, dtype=dtype)
    # Read straight into the array: no intermediate copy of a 47 MB payload.
    view = array.reshape(-1).view(np.uint8).data
    got = _read_exactly(stream, view)
    if got < array.nbytes:
        raise _fail(
            path,
            f"{array.nbytes} data bytes for shape {shape} and dtype {dtype.name}",
            f"only {got} (truncated file)",
        )
    extra = stream.read(1)
    if extra:
        rest = 1 + len(stream.read())
        raise _fail(
            path,
            f"{array.nbytes} data bytes for shape {shape} and dtype {dtype.name}",
            f"{rest} trailing bytes after them",
        )
    if dtype.byteorder not in ("=", "|"):
        array = array.astype(dtype.newbyteorder("="))
    return array


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a NumPy array.

    The magic number, the type code and the size are checked: the file must hold exactly
    the bytes its header announces, no fewer (truncated) and no more (trailing bytes).

    Args:
        path: the file. Gzip compression is detected from the content, whatever the name.

    Returns:
        An array of the shape given in the header, in native byte order (``uint8`` for the
        MNIST files).

    Raises:
        CorruptFileError: (a :class:`ValueError`) naming the file, what was expected and
            what was found.
        FileNotFoundError: if the file does not exist.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + "/tiny-idx2-ubyte.gz"
        >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
        >>> read_idx(path)
        array([[0, 1, 2],
               [3, 4, 5]], dtype=uint8)
    """
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        if not compressed:
            return _read_stream(raw, path)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _read_stream(stream, path)  # type: ignore[arg-type]
        except (OSError, EOFError, zlib.error) as error:
            raise _fail(path, "a valid gzip stream", f"{type(error).__name__}: {error}") from error


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write an array as an IDX file, gzip-compressed when the name ends in ``.gz``.

    Args:
        path: the file to write.
        array: at least one dimension, of dtype ``uint8``, ``int8``, ``int16``,
            ``int32``, ``float32`` or ``float64``.

    Raises:
        ValueError: for a dtype IDX cannot hold or a 0-dimensional array.

    Example:
        >>> import tempfile, numpy as np
        >>> path = tempfile.mkdtemp() + "/labels-idx1-ubyte"
        >>> write_idx(path, np.array([7, 2, 1], dtype=np.uint8))
        >>> read_idx(path).tolist()
        [7, 2, 1]
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        known = ", ".join(sorted(str(d) for d in _CODES))
        raise ValueError(f"write_idx: expected a dtype in ({known}), got {array.dtype}")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: expected 1 to 255 dimensions, got {array.ndim}")
    code = _CODES[native]
    header = struct.pack(f">HBB{array.ndim}i", 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if Path(path).name.endswith(".gz"):
        # mtime=0: the same array always gives the same bytes.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            out.write(header)
            out.write(payload)
    else:
        with open(path, "wb") as out:
            out.write(header)
            out.write(payload)
