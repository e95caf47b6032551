"""Reading the producer's recorded chain heads (SPEC 5.3) from the key-value bucket."""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from schemas.heads import ChainHead

_decoder = msgspec.json.Decoder(ChainHead)


async def read_heads(js: JetStreamContext, bucket: str) -> dict[str, ChainHead]:
    """Every recorded head, by ``<cellId>.<runId>.<chainId>``; empty when the bucket does not
    exist."""
    try:
        kv = await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return {}
    heads: dict[str, ChainHead] = {}
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return {}
    for key in keys:
        entry = await kv.get(key)
        if entry.value:
            heads[key] = _decoder.decode(entry.value)
    return heads
