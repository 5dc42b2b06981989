"""Byte-level building blocks for payloads: a strict writer/reader pair.

Methods build their message bodies with :class:`Writer` and parse them with
:class:`Reader`. The reader never trusts a length it has not checked against the
bytes actually present, so a hostile or truncated payload raises
:class:`~fedbits.errors.WireError` before anything large is allocated.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import torch

from fedbits.errors import WireError

# Wire dtype codes. Values travel little-endian, whatever the host.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.int8: 4,
    torch.uint8: 5,
    torch.int32: 6,
    torch.int64: 7,
    torch.float64: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} cannot be sent on the wire") from None


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (bfloat16 via its 16-bit pattern)."""
    flat = t.detach().contiguous().reshape(-1).cpu()
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return flat.numpy().astype(flat.numpy().dtype.newbyteorder("<"), copy=False).tobytes()


def tensor_from_bytes(buf: bytes | memoryview, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Inverse of :func:`tensor_bytes`; returns a writable 1-D tensor."""
    if dtype == torch.bfloat16:
        arr = np.frombuffer(buf, dtype="<i2", count=count)
        return torch.from_numpy(arr.copy()).view(torch.bfloat16)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    arr = np.frombuffer(buf, dtype=np_dtype, count=count)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


Body = bytes | memoryview
"""A message body as a method's half receives it: a read-only view into the sealed
payload (no copy of a model-sized body), which :class:`Reader` reads like bytes."""


class Writer:
    """Appends fixed-width little-endian fields and tensors to a byte buffer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack("<Q", v))
        return self

    def f32(self, v: float) -> Writer:
        self._parts.append(struct.pack("<f", v))
        return self

    def f64(self, v: float) -> Writer:
        self._parts.append(struct.pack("<d", v))
        return self

    def raw(self, b: bytes) -> Writer:
        self._parts.append(bytes(b))
        return self

    def blob(self, b: bytes) -> Writer:
        """Length-prefixed bytes (u32 length)."""
        return self.u32(len(b)).raw(b)

    def text(self, s: str) -> Writer:
        data = s.encode("utf-8")
        if len(data) > 255:
            raise WireError(f"text field too long for the wire ({len(data)} > 255 bytes)")
        return self.u8(len(data)).raw(data)

    def tensor(self, t: torch.Tensor) -> Writer:
        """dtype code (u8), element count (u64), raw values. Shape is not sent: both
        sides derive it from the model (see :class:`fedbits.wire.layout.Layout`)."""
        return self.u8(dtype_code(t.dtype)).u64(t.numel()).raw(tensor_bytes(t))

    def tensors_as_one(self, tensors: Iterable[torch.Tensor], dtype: torch.dtype) -> Writer:
        """What :meth:`tensor` writes for the concatenation of ``tensors`` in ``dtype``,
        without building it: a model's weights go out with one copy (their bytes), not
        two (a flat tensor, then its bytes)."""
        parts = [tensor_bytes(t.detach().to(dtype)) for t in tensors]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.u8(dtype_code(dtype)).u64(sum(len(part) for part in parts) // itemsize)
        self._parts.extend(parts)
        return self

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads what :class:`Writer` wrote; every read is bounds-checked."""

    def __init__(self, data: bytes | bytearray | memoryview, what: str = "payload") -> None:
        self._view = memoryview(data).toreadonly()
        self._pos = 0
        self._what = what

    @property
    def what(self) -> str:
        """Who sent these bytes, for error messages (e.g. "client 3 uplink")."""
        return self._what

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def _take(self, n: int, field: str) -> memoryview:
        if n < 0 or n > self.remaining:
            raise WireError(
                f"{self._what}: truncated at byte {self._pos}: field {field} needs {n} bytes, "
                f"{self.remaining} left"
            )
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str = "u8") -> int:
        return self._take(1, field)[0]

    def u32(self, field: str = "u32") -> int:
        return struct.unpack("<I", self._take(4, field))[0]

    def u64(self, field: str = "u64") -> int:
        return struct.unpack("<Q", self._take(8, field))[0]

    def f32(self, field: str = "f32") -> float:
        return struct.unpack("<f", self._take(4, field))[0]

    def f64(self, field: str = "f64") -> float:
        return struct.unpack("<d", self._take(8, field))[0]

    def raw(self, n: int, field: str = "raw") -> bytes:
        return bytes(self._take(n, field))

    def view(self, n: int, field: str = "raw") -> memoryview:
        """The next ``n`` bytes without copying them: a read-only view that keeps the
        whole payload alive (for a body the size of a model, not for small fields)."""
        return self._take(n, field)

    def blob(self, field: str = "blob") -> bytes:
        return self.raw(self.u32(field + ".length"), field)

    def text(self, field: str = "text") -> str:
        raw = self.raw(self.u8(field + ".length"), field)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{self._what}: field {field} is not valid UTF-8") from None

    def tensor(
        self, field: str, *, count: int | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read a tensor, checking its declared dtype and count against what the
        receiver expects and against the bytes present before allocating."""
        code = self.u8(field + ".dtype")
        if code not in CODE_DTYPES:
            raise WireError(f"{self._what}: field {field}: unknown dtype code {code}")
        got_dtype = CODE_DTYPES[code]
        if dtype is not None and got_dtype != dtype:
            raise WireError(f"{self._what}: field {field}: dtype {got_dtype}, expected {dtype}")
        n = self.u64(field + ".count")
        if count is not None and n != count:
            raise WireError(f"{self._what}: field {field}: {n} values, expected {count}")
        itemsize = torch.empty(0, dtype=got_dtype).element_size()
        if n * itemsize > self.remaining:
            raise WireError(
                f"{self._what}: field {field} declares {n} values ({n * itemsize} bytes) "
                f"but only {self.remaining} bytes remain"
            )
        return tensor_from_bytes(self._take(n * itemsize, field), got_dtype, n)

    def finish(self) -> None:
        """Reject trailing bytes: a payload must be exactly what its fields describe."""
        if self.remaining:
            raise WireError(f"{self._what}: {self.remaining} unexpected trailing bytes")

