"""Reads the history a W&B offline run file (``run-<id>.wandb``) holds: what ``wandb sync`` would upload.

The file is W&B's ``:W&B`` header followed by a LevelDB-style log (32 KiB blocks of records: 4-byte checksum, 2-byte
length, 1-byte type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record`` messages; wandb >= 0.19 no longer ships a Python
reader for it."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def history(path: Path) -> list[dict]:
    """The history rows in file order, values decoded from JSON; W&B's own keys (``_step``, ...) kept."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for raw in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
