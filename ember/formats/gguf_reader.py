"""Opening a GGUF file: a faster `gguf.GGUFReader`, and one-line errors for every way a file can be bad."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from ember.errors import ModelLoadError

_ARRAY, _STRING = int(gguf.GGUFValueType.ARRAY), int(gguf.GGUFValueType.STRING)


class _StringPart(bytes):
    """One string of a string array, as the bytes `ReaderField.contents()` decodes (via `tobytes`).

    The stock reader keeps two numpy views per string (its length and its bytes):
    ~40 MiB of small objects for SmolLM2's 98k vocabulary and merge strings, at
    the moment a load's resident memory peaks. A bytes object costs ~40 bytes
    plus the string; the lengths are not kept (nothing reads them).
    """

    __slots__ = ()

    def tobytes(self) -> bytes:
        return bytes(self)


class MappedReader(gguf.GGUFReader):
    """`gguf.GGUFReader`, made fast enough to open a 50k-token vocabulary in a few tens of ms.

    The stock reader slices an `np.memmap` twice per string, and memmap slicing is
    slow (~3 s for SmolLM2); here it slices a plain ndarray view of the same map and
    reads string arrays in one loop, keeping each string as bytes (without its
    length part). `field.contents()` and the tensors are the same as the stock
    reader's.
    """

    @property
    def data(self) -> np.ndarray:
        return self._plain_view

    @data.setter
    def data(self, memmap: np.memmap) -> None:
        self._memmap = memmap
        self._plain_view = memmap.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
        if raw_type != _ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(item_type[0]))]
        offset, parts = orig_offs + 12, [item_type, count]
        if item_type[0] == _STRING:
            buffer = self._plain_view
            for _ in range(int(count[0])):
                (length,) = struct.unpack_from("<Q", buffer, offset)
                end = offset + 8 + length
                if end > buffer.size:
                    raise ValueError("string runs past the end of the file")
                parts.append(_StringPart(buffer[offset + 8 : end].tobytes()))
                offset = end
            return offset - orig_offs, parts, list(range(2, len(parts))), types
        scalar_type = self.gguf_scalar_to_np.get(types[1])
        if scalar_type is None:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offset, scalar_type, int(count[0]))
        if len(values) != count[0]:
            raise ValueError("array runs past the end of the file")
        parts += [values[index : index + 1] for index in range(len(values))]
        return 12 + values.nbytes, parts, list(range(2, len(parts))), types

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        """Check every tensor's type and byte range first: a truncated file fails with a clear message."""
        file_size = self._plain_view.size
        for tensor_field in fields:
            _, name_data, _, dims, raw_type, relative_offset = tensor_field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            try:
                ggml_type = gguf.GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise ModelLoadError(f"tensor {name!r} has unknown GGML type id {int(raw_type[0])}") from None
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
            end = start_offs + int(relative_offset[0]) + int(np.prod(dims)) * block_bytes // block_values
            if end > file_size:
                raise ModelLoadError(
                    f"{self._memmap.filename} is truncated: tensor {name!r} ends at byte {end} "
                    f"but the file has {file_size} bytes"
                )
        super()._build_tensors(start_offs, fields)


def open_gguf(path: Path) -> MappedReader:
    """Open a GGUF file, turning every way it can fail into a one-line `ModelLoadError`."""
    if not path.exists():
        raise ModelLoadError(f"{path} not found")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = MappedReader(path, "c")  # copy-on-write map: tensors are writable, the file is not
    except ModelLoadError:
        raise
    except Exception as error:  # the gguf package raises many kinds on a damaged header
        problem = find_header_problem(path)
        if problem is not None:
            raise ModelLoadError(f"{path}: {problem}") from None
        raise ModelLoadError(f"{path} is truncated or corrupt (unreadable GGUF header: {error})") from None
    if reader.byte_order != "I":
        raise ModelLoadError(f"{path} is a big-endian GGUF file, which ember does not read")
    return reader


# GGUF value type id -> size in bytes of a scalar of it (8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMENSIONS = 4  # GGML_MAX_DIMS


class _HeaderProblem(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def find_header_problem(path: Path) -> str | None:
    """Where a GGUF header first goes wrong, as a sentence with its byte offset (None: it looks whole).

    Run only after the reader failed: walks the header as the format defines it
    (magic, version, counts, key/value pairs, tensor infos), so a short or damaged
    file is reported as "truncated GGUF header at byte N" or "invalid GGUF header at
    byte N: ..." rather than as the numpy or struct error the reader met.
    """
    data = path.read_bytes() if path.stat().st_size < (1 << 20) else None
    if data is None:  # large file: the header is at the start; read it through a map
        data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    size = len(data)
    offset = 0

    def take(count: int, what: str) -> int:
        nonlocal offset
        if offset + count > size:
            raise _HeaderProblem(
                f"truncated GGUF header at byte {offset}: {what} needs {count} bytes, "
                f"the file has {size - offset} more"
            )
        start, offset = offset, offset + count
        return start

    def unsigned(count: int, what: str) -> int:
        start = take(count, what)
        return int.from_bytes(bytes(data[start : start + count]), "little")

    def string(what: str) -> None:
        length = unsigned(8, f"the length of {what}")
        take(length, what)

    def value(type_id: int, what: str, depth: int = 0) -> None:
        at = offset - 4
        if type_id in _SCALAR_SIZES:
            take(_SCALAR_SIZES[type_id], what)
        elif type_id == 8:
            string(what)
        elif type_id == 9 and depth == 0:
            item_type = unsigned(4, f"the item type of {what}")
            count = unsigned(8, f"the length of {what}")
            if item_type in _SCALAR_SIZES:
                take(count * _SCALAR_SIZES[item_type], f"{what} ({count} items)")
            else:
                for _ in range(count):
                    value(item_type, f"an item of {what}", depth + 1)
        else:
            raise _HeaderProblem(f"invalid GGUF header at byte {at}: {what} has unknown value type {type_id}")

    try:
        take(4, "the magic bytes")
        version = unsigned(4, "the version")
        if version not in (2, 3):
            raise _HeaderProblem(f"invalid GGUF header at byte 4: version {version} (ember reads 2 and 3)")
        tensor_count = unsigned(8, "the tensor count")
        pair_count = unsigned(8, "the metadata count")
        for index in range(pair_count):
            string(f"metadata key {index + 1} of {pair_count}")
            type_id = unsigned(4, f"the type of metadata value {index + 1}")
            value(type_id, f"metadata value {index + 1}")
        for index in range(tensor_count):
            string(f"the name of tensor {index + 1} of {tensor_count}")
            at = offset
            dimensions = unsigned(4, f"the dimension count of tensor {index + 1}")
            if dimensions > _MAX_DIMENSIONS:
                raise _HeaderProblem(
                    f"invalid GGUF header at byte {at}: tensor {index + 1} has {dimensions} dimensions "
                    f"(at most {_MAX_DIMENSIONS})"
                )
            take(8 * dimensions + 4 + 8, f"the shape, type and offset of tensor {index + 1}")
    except _HeaderProblem as problem:
        return problem.message
    return None
