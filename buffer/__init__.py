"""Replay: msgpack codec, FIFO shard of fixed-length windows, rate limiter, sharded client.
Needs numpy and msgpack only (no torch, no Ray)."""

from choreo.buffer.client import ReplayClient, route
from choreo.buffer.codec import CodecError, decode, encode
from choreo.buffer.limiter import RateLimiter
from choreo.buffer.shard import CheckpointMismatchError, ReplayEmptyError, ReplayShard

__all__ = ["CheckpointMismatchError", "CodecError", "RateLimiter", "ReplayClient", "route", "ReplayEmptyError",
           "ReplayShard", "decode", "encode"]
