"""Parse a GGUF file (v2/v3, little-endian): its metadata as plain Python values, its tensors as views.

The layout (llama.cpp's gguf.cpp): magic "GGUF", u32 version, u64 tensor count, u64 KV count; each KV is
a string key (u64 length + UTF-8 bytes), a u32 value type and the value (an array is a u32 element
type, a u64 count and the elements); each tensor info is a name, u32 n_dims, n_dims u64 dims (ggml
order, ne0 first), a u32 ggml type and a u64 offset into the data section, which starts at the next
multiple of `general.alignment` (default 32) after the infos.

Why not the `gguf` package's GGUFReader (still our oracle in the tests, and still what dequantizes
and writes): it builds a numpy memmap view per value, which takes seconds for a 262k-token vocabulary.
Here a string array is one loop of struct.unpack_from over the memory map, a numeric array one
np.frombuffer(...).tolist(), and the values come out exactly as ReaderField.contents() gives them.

The bytes are untrusted: every length and count is checked against the bytes that remain before
anything is allocated or read, so a corrupt count is a GGUFError naming the file, never a MemoryError
or a hang. Tensor data is a read-only numpy view of the memory map, shaped as GGUFReader shapes it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

STRING, ARRAY, UINT32 = 8, 9, 4
# value type → little-endian numpy dtype of the scalar types (GGUFValueType's numbering)
SCALARS = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
    5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}  # fmt: skip
FORMATS = {t: struct.Struct("<" + d.char) for t, d in SCALARS.items()}
Q = GGMLQuantizationType
# ggml types GGUFReader views as elements (reversed dims); every other type is rows of raw block bytes
ELEMENTS = {Q.F32: "<f4", Q.F16: "<f2", Q.F64: "<f8", Q.I8: "<i1", Q.I16: "<i2", Q.I32: "<i4", Q.I64: "<i8"}
U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
MIN_KV, MIN_INFO = 8 + 4 + 1, 8 + 4 + 4 + 8  # the fewest bytes a KV entry (u8 value) and a tensor info take


class GGUFError(ValueError):
    """A GGUF file that cannot be read or written as asked; the message names the file and the problem."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, with the attributes of gguf.ReaderTensor that gptstack uses."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # (n_dims,) uint64, ggml order (ne0 first)
    data: np.ndarray  # read-only view: elements (ne_last, ..., ne0), or uint8 (..., ne0 / block · block bytes)


class _Cursor:
    """A position in the file's bytes; every read checks that the bytes are there."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: truncated or corrupt ({problem})")

    def need(self, n: int, what: str) -> int:
        """The position of the next n bytes, which the cursor moves past."""
        left = len(self.buf) - self.pos
        if n > left:
            raise self.fail(f"{what} at byte {self.pos}: {n} bytes needed, {left} remain")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        return fmt.unpack_from(self.buf, self.need(fmt.size, what))[0]

    def string(self, what: str) -> str:
        """A length-prefixed string; bytes that are not UTF-8 raise UnicodeDecodeError."""
        n = self.scalar(U64, what)
        start = self.need(n, what)
        return self.buf[start : start + n].decode()

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value as ReaderField.contents() gives it: str, int, float, bool or a list."""
        if vtype == STRING:
            return self.string(f"the string of {key}")
        if vtype == ARRAY:
            return self.array(key)
        if vtype not in FORMATS:
            raise self.fail(f"metadata field {key} has unknown value type {vtype}")
        return self.scalar(FORMATS[vtype], f"the value of {key}")

    def array(self, key: str) -> list:
        etype, count = self.scalar(U32, f"the array type of {key}"), self.scalar(U64, f"the array length of {key}")
        if etype == STRING:
            return self.strings(count, key)
        if etype not in SCALARS:
            kind = "nested arrays are not supported" if etype == ARRAY else f"unknown element type {etype}"
            raise self.fail(f"metadata field {key}: {kind}")
        dtype = SCALARS[etype]
        start = self.need(count * dtype.itemsize, f"the {count} elements of {key}")
        return np.frombuffer(self.buf, dtype, count, start).tolist()

    def strings(self, count: int, key: str) -> list[str]:
        """`count` length-prefixed strings: the hot loop of a vocabulary (262k strings for Gemma 3)."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), U64.unpack_from
        if count * 8 > end - pos:
            raise self.fail(f"the {count} strings of {key} need at least {count * 8} bytes, {end - pos} remain")
        out = []
        for i in range(count):
            if pos + 8 > end:
                raise self.fail(f"string {i} of {key} runs past the end")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise self.fail(f"string {i} of {key} ({n} bytes) runs past the end")
            out.append(buf[pos : pos + n].decode())
            pos += n
        self.pos = pos
        return out


def read_gguf_file(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(metadata, tensors by name) of a GGUF file, values as GGUFReader's ReaderField.contents() gives them."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise GGUFError(f"{path}: truncated or corrupt (the file is empty)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file object; the views hold it
    cur = _Cursor(buf, path)
    _header(cur)
    n_tensors, n_kv = cur.scalar(U64, "the tensor count"), cur.scalar(U64, "the metadata count")
    if n_kv * MIN_KV + n_tensors * MIN_INFO > len(buf) - cur.pos:
        raise cur.fail(f"{n_kv} metadata fields and {n_tensors} tensors cannot fit in {len(buf)} bytes")
    meta, types = _metadata(cur, n_kv)
    infos = [_tensor_info(cur, i) for i in range(n_tensors)]
    start = _data_start(cur, meta, types)
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, ggml_type, offset in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name} appears twice")
        tensors[name] = _tensor(cur, name, dims, ggml_type, start + offset)
    return meta, tensors


def _header(cur: _Cursor) -> None:
    if cur.buf[:4] != b"GGUF":
        raise GGUFError(f"{cur.path}: not a GGUF file (wrong magic bytes)")
    cur.need(4, "the magic")
    version = cur.scalar(U32, "the version")
    if version & 0xFFFF == 0:
        raise GGUFError(f"{cur.path}: a big-endian GGUF file (version {version:#x}), which gptstack does not read")
    if version not in (2, 3):
        raise GGUFError(f"{cur.path}: GGUF version {version} is not supported (2 or 3)")


def _metadata(cur: _Cursor, count: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(key → value, key → value type)."""
    meta, types = {}, {}
    for i in range(count):
        try:
            key = cur.string(f"metadata key {i}")
        except UnicodeDecodeError:
            raise cur.fail(f"metadata key {i} is not UTF-8") from None
        if key in types:
            raise cur.fail(f"metadata field {key} appears twice")
        types[key] = cur.scalar(U32, f"the value type of {key}")
        try:
            value = cur.value(types[key], key)
        except UnicodeDecodeError as e:
            raise GGUFError(f"{cur.path}: metadata field {key} is unreadable ({e})") from None
        if not key.startswith("GGUF."):  # GGUFReader's names for the header, which open_gguf never listed
            meta[key] = value
    return meta, types


def _tensor_info(cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    """(name, dims in ggml order, type, offset into the data section) of tensor info i."""
    try:
        name = cur.string(f"the name of tensor {i}")
    except UnicodeDecodeError:
        raise cur.fail(f"the name of tensor {i} is not UTF-8") from None
    n_dims = cur.scalar(U32, f"the dimension count of {name}")
    dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.need(8 * n_dims, f"the dimensions of {name}"))
    raw = cur.scalar(U32, f"the type of {name}")
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        raise GGUFError(f"{cur.path}: tensor {name} has unknown ggml type {raw}") from None
    return name, dims, ggml_type, cur.scalar(U64, f"the offset of {name}")


def _data_start(cur: _Cursor, meta: dict[str, Any], types: dict[str, int]) -> int:
    """Where the data section starts: the end of the infos rounded up to `general.alignment`."""
    align = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if "general.alignment" in types and types["general.alignment"] != UINT32:
        raise cur.fail("general.alignment is not a u32")
    if align == 0 or align & (align - 1):
        raise cur.fail(f"general.alignment {align} is not a power of two")
    return -(-cur.pos // align) * align


def _tensor(cur: _Cursor, name: str, dims: tuple[int, ...], ggml_type: Q, at: int) -> GGUFTensor:
    """The tensor's read-only view of the file, shaped and typed as GGUFReader's ReaderTensor.data."""
    shape = tuple(reversed(dims))  # ggml [ne0, ne1] → (ne1, ne0)
    if ggml_type in ELEMENTS:
        dtype = np.dtype(ELEMENTS[ggml_type])
    else:  # rows of blocks: (..., ne0) weights → (..., ne0 / block · block bytes) bytes
        block, size = GGML_QUANT_SIZES[ggml_type]
        if not shape or shape[-1] % block:
            raise cur.fail(f"tensor {name} {list(dims)}: rows are not whole {ggml_type.name} blocks of {block}")
        shape, dtype = (*shape[:-1], shape[-1] // block * size), np.dtype(np.uint8)
    n_bytes = dtype.itemsize * int(np.prod(shape, dtype=object))  # exact: Python ints, no uint64 overflow
    if at + n_bytes > len(cur.buf):
        raise cur.fail(f"tensor {name}'s {n_bytes} bytes at byte {at} run past the end of the file ({len(cur.buf)})")
    data = np.ndarray(shape, dtype, buffer=cur.buf, offset=at)
    return GGUFTensor(name, ggml_type, np.array(dims, dtype=np.uint64), data)
