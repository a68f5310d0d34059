"""``log.tensorboard=true``: the run's numeric metrics as a TensorBoard event file in
``tensorboard/`` (``tensorboard --logdir runs/``), written directly, without TensorFlow.

An event file is a sequence of records ``length (u64) | masked CRC32C of length | data | masked
CRC32C of data``, each ``data`` an ``Event`` protocol buffer: ``wall_time`` (1, double),
``step`` (2, int64), ``file_version`` (3, string) or ``summary`` (5: values with ``tag`` (1) and
``simple_value`` (2, float)).
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord files use."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or message)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """One serialized ``Event``."""
    data = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        data += _field(3, file_version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + _varint(2 << 3 | 5)
                                 + struct.pack("<f", value)) for tag, value in scalars.items())
        data += _field(5, values)
    return data


def record(data: bytes) -> bytes:
    """``data`` framed as a TFRecord."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked(crc32c(length))) + data
            + struct.pack("<I", _masked(crc32c(data))))


class EventWriter:
    """Scalars of metric records into ``folder/events.out.tfevents.<time>.<host>``; the file
    is created with the first record."""

    def __init__(self, folder: str | Path):
        self.folder, self.path = Path(folder), None

    def write(self, record_: dict) -> None:
        """The numeric entries of a metrics record (``step`` and booleans aside), at its step."""
        scalars = {k: float(v) for k, v in record_.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        now = time.time()
        data = b""
        if self.path is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path = self.folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
            data = record(event(now, 0, file_version="brain.Event:2"))
        data += record(event(now, int(record_["step"]), scalars=scalars))
        with self.path.open("ab") as f:
            f.write(data)
