"""The one /pooling call every PRM client makes (the learned head's hidden states, a step-tag PRM's logits, and
train-prm's features): token ids in, one item per input back in input order, the count checked."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from .pool import WorkerError, WorkerPool


async def pooling(pool: WorkerPool, model: str, token_lists: list[list[int]],
                  **options: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-input items sorted by index, the usage block). A worker that answers for fewer or more inputs than it
    was sent is a broken answer (502), never silently misaligned scores."""
    body = await pool.post_json("/pooling", {"model": model, "input": token_lists, **options})
    data = sorted(body.get("data") or [], key=lambda d: int(d.get("index", 0)))
    if len(data) != len(token_lists):
        raise WorkerError(pool.name, 502, f"/pooling returned {len(data)} results for {len(token_lists)}")
    return data, body.get("usage") or {}


def decode_hidden(item: dict[str, Any]) -> np.ndarray:
    """One item's per-token vectors, flat float32 (the caller reshapes to tokens x d)."""
    data = item.get("data")
    if isinstance(data, str):  # base64 float32 (encoding_format="base64")
        return np.frombuffer(base64.b64decode(data), dtype=np.float32)
    return np.asarray(data, dtype=np.float32)
