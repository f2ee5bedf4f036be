"""Stored-value envelope: magic, version, CRC32 of the body, then the body.

A truncated, foreign or bit-flipped entry fails the check and is served as a miss instead of being parsed.
"""

from __future__ import annotations

import struct
import zlib

MAGIC = b"TC"
VERSION = 1
_HEADER = struct.Struct(">2sBxI")  # magic, version, pad, crc32 = 8 bytes
HEADER_SIZE = _HEADER.size


def wrap(body: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, zlib.crc32(body)) + body


def unwrap(raw: bytes | bytearray | memoryview | None) -> bytes | None:
    """The body, or None when `raw` is not a valid envelope of this version."""
    if raw is None or len(raw) < HEADER_SIZE:
        return None
    raw = bytes(raw)
    magic, version, crc = _HEADER.unpack_from(raw)
    body = raw[HEADER_SIZE:]
    if magic != MAGIC or version != VERSION or zlib.crc32(body) != crc:
        return None
    return body
