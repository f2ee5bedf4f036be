"""Cache keys and cache policy: what may be cached, under which key, and what the client asked for.

Keys are sha256 over canonical JSON so that semantically equal requests (dict order, 1 vs 1.0) share an entry,
and the tenant is always hashed in so two tenants never share an entry (LiteLLM's isolation gap).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any, NamedTuple

import orjson

# Bump to invalidate every key at once when the canonical form changes.
KEY_VERSION = 1
_NAMESPACE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_INT64 = 2**63
# Floats with integral value are hashed as ints only where that is exact.
_EXACT_FLOAT_INT = 2**53
# Request fields that do not change the distribution a sample is drawn from: the sample store pools across them.
SAMPLE_KEY_EXCLUDED = frozenset({"n", "seed", "stream", "stream_options", "user", "request_id"})


def _canonical(value: Any) -> Any:
    # bool before int: True is an int subclass but must not hash like 1.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else {"$int": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"$float": repr(value)}
        if value.is_integer() and abs(value) < _EXACT_FLOAT_INT:
            return int(value)  # also maps -0.0 to 0
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):  # pydantic models
        return _canonical(value.model_dump())
    # Anything else could hash unstably (repr with addresses): refuse rather than build a wrong key.
    raise TypeError(f"cache_key: cannot canonicalise {type(value).__name__}")


def canonical_json(payload: Any) -> bytes:
    return orjson.dumps(_canonical(payload), option=orjson.OPT_SORT_KEYS)


def cache_key(namespace: str, tenant: str, payload: dict) -> str:
    """`"<namespace>:<sha256 hex>"`; the readable prefix lets backends label metrics and operators scan by kind."""
    if not _NAMESPACE_RE.match(namespace):
        raise ValueError(f"cache_key: bad namespace {namespace!r}")
    if not isinstance(tenant, str):
        raise TypeError("cache_key: tenant must be a str")
    doc = {"v": KEY_VERSION, "ns": namespace, "tenant": tenant, "payload": payload}
    return f"{namespace}:{hashlib.sha256(canonical_json(doc)).hexdigest()}"


def samples_key(tenant: str, payload: dict) -> str:
    """Key of the sample pool: the request without the fields that do not change what one sample looks like."""
    return cache_key("samples", tenant, {k: v for k, v in payload.items() if k not in SAMPLE_KEY_EXCLUDED})


def key_kind(key: str) -> str:
    """Metric label for a key: its namespace prefix, or "other" (bounded cardinality)."""
    ns, sep, _ = key.partition(":")
    return ns if sep and _NAMESPACE_RE.match(ns) else "other"


def cacheable_response(n: int, temperature: float, seed: int | None) -> bool:
    """Only deterministic single responses are cached by default; caching a sampled answer would freeze it."""
    return n == 1 and (temperature == 0 or seed is not None)


class CacheDirectives(NamedTuple):
    no_cache: bool = False  # do not serve from cache (still store unless no_store)
    no_store: bool = False  # do not write this response to the cache


def parse_cache_control(header: str | None) -> CacheDirectives:
    if not header:
        return CacheDirectives()
    no_cache = no_store = False
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name == "no-cache":
            no_cache = True
        elif name == "no-store":
            no_store = True
        elif name == "max-age" and value.strip().strip('"') == "0":
            no_cache = True  # RFC 9111: a request with max-age=0 will not accept a stored response unvalidated
    return CacheDirectives(no_cache=no_cache, no_store=no_store)
