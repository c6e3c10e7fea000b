"""Bounded LRU of backbone features keyed by image content hash.

The key is a hash of what the client sent (the decoded base64 bytes of an image, or the
float32 bytes and shape of an array), so predict-then-adapt on the same image runs the backbone
once. Thread-safe: looked up by the decode threads, filled by the batch worker.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch


def image_key(data: bytes) -> str:
    return "img:" + hashlib.blake2b(data, digest_size=20).hexdigest()


def array_key(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array, dtype=np.float32)
    h = hashlib.blake2b(digest_size=20)
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())
    return "arr:" + h.hexdigest()


class FeatureCache:
    def __init__(self, capacity: int, metrics=None) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self._metrics = metrics
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[torch.Tensor]:
        """The cached features [d] for `key`, or None; counts a hit or a miss."""
        if self.capacity <= 0:
            return None
        with self._lock:
            feats = self._entries.get(key)
            if feats is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if self._metrics is not None:
            (self._metrics.cache_hits if feats is not None else self._metrics.cache_misses).inc()
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[key] = feats
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            n = len(self._entries)
        if self._metrics is not None:
            self._metrics.cache_entries.set(n)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        if self._metrics is not None:
            self._metrics.cache_entries.set(0)
