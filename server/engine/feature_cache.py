"""Bounded LRU of backbone features keyed by image content hash.

The key is a hash of what the client sent (made by the API's decoder, server/api/decode.py),
so predict-then-adapt on the same image runs the backbone once. Looked up and filled by the
engine's batch worker before the backbone runs; thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch


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
