"""A long video is decoded and prefilled once per conversation.

Three kinds of entries share one memory budget, evicted least recently used:

- **decoded frames**, keyed by the media's content hash and how it is sampled and sized: a second
  question about the same video skips PyAV and the resize;
- **visual features** (the projector's output) under the same key and the frames kept: a
  question about a video whose KV cache is not there (evicted, in use by another request about
  the same video, or a prompt that shares no prefix with a kept one) skips the vision tower;
- **KV caches of prompts** (transformers' ``DynamicCache``), keyed by the media key and the token
  ids they hold (the prompt and the reply decoded after it). A new prompt takes the entry that
  shares its longest token prefix, provided the shared part covers every visual token (the rest
  is text, which the language model embeds itself), and prefills only what follows. OpenAI
  clients resend the whole history, so the next turn of a conversation shares the previous
  prompt and reply; a new question about the same video shares the video.

An entry is taken out while a request uses it (two requests never write one cache) and the
longer cache that request ends with is put back. transformers reuses a prompt cache the same way
(``past_key_values`` passed to ``generate``); what it leaves to the caller is choosing the entry,
bounding the memory and keeping the frames.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class PrefixEntry:
    media: str | None
    tokens: list[int]
    """The token ids the cache holds keys and values for, in order."""
    cache: Any
    nbytes: int


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    array_a, array_b = np.asarray(a[:n]), np.asarray(b[:n])
    return int(np.argmin(array_a == array_b))


def content_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class PrefixCache:
    """Decoded frames, visual features and prompt KV caches within ``budget_bytes`` (see the
    module docstring)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, tuple[str, Any, int]] = OrderedDict()  # id -> (kind, value, bytes)
        self._keys: dict[tuple[str, str], int] = {}  # (kind, media key) -> entry id
        self._next = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self._entries.values())

    def _add(self, kind: str, value: Any, size: int) -> int | None:
        if size > self.budget:
            return None
        ident, self._next = self._next, self._next + 1
        self._entries[ident] = (kind, value, size)
        total = self.nbytes
        while total > self.budget:
            old, (old_kind, old_value, old_size) = self._entries.popitem(last=False)
            total -= old_size
            if old_kind in ("frames", "features"):
                self._keys = {k: v for k, v in self._keys.items() if v != old}
        return ident

    # -- frames and visual features -------------------------------------------------------------

    def _get(self, kind: str, key: str) -> Any | None:
        with self._lock:
            ident = self._keys.get((kind, key))
            if ident is None or ident not in self._entries:
                return None
            self._entries.move_to_end(ident)
            return self._entries[ident][1]

    def _put(self, kind: str, key: str, value: Any, size: int) -> None:
        with self._lock:
            if (kind, key) in self._keys and self._keys[(kind, key)] in self._entries:
                return  # two requests about one new video at once: the first one's copy is kept
            ident = self._add(kind, value, size)
            if ident is not None:
                self._keys[(kind, key)] = ident

    def frames(self, key: str) -> Any | None:
        return self._get("frames", key)

    def put_frames(self, key: str, media: Any) -> None:
        self._put("frames", key, media, int(media.frames.nbytes + media.timestamps.nbytes))

    def features(self, key: str) -> Any | None:
        """The projected visual tokens of the media ``key`` names (the vision tower's output)."""
        return self._get("features", key)

    def put_features(self, key: str, features: Any) -> None:
        self._put("features", key, features, features.numel() * features.element_size())

    # -- prompt caches -------------------------------------------------------------------------

    def match(self, media: str | None, ids: list[int], visual_end: int) -> int:
        """How many leading tokens of ``ids`` the best entry would serve (0: none)."""
        with self._lock:
            return self._best(media, ids, visual_end)[1]

    def _best(self, media: str | None, ids: list[int], visual_end: int) -> tuple[int | None, int]:
        best, length = None, 0
        for ident, (kind, entry, _) in self._entries.items():
            if kind != "prefix" or entry.media != media:
                continue
            shared = min(common_prefix(entry.tokens, ids), len(ids) - 1)  # the last token is always prefilled
            if shared >= max(visual_end, 1) and shared > length:
                best, length = ident, shared
        return best, length

    def take(self, media: str | None, ids: list[int], visual_end: int) -> tuple[Any, int] | None:
        """The cache of the entry sharing the longest prefix with ``ids``, cropped to it, and that
        length; the entry leaves the cache until ``put`` brings back what it became."""
        with self._lock:
            ident, length = self._best(media, ids, visual_end)
            if ident is None:
                self.misses += 1
                return None
            _, entry, _ = self._entries.pop(ident)
            self.hits += 1
        held = entry.cache.get_seq_length()
        if held > length:
            entry.cache.crop(length - held)  # transformers 5: crop takes the (negative) count to remove
        return entry.cache, length

    def put(self, media: str | None, tokens: list[int], cache: Any) -> None:
        """Adds a prompt's cache; an entry that holds a prefix of ``tokens`` is replaced by it, and
        nothing is added when an entry already holds all of ``tokens`` (repeated questions do not
        fill the budget with copies)."""
        entry = PrefixEntry(media, list(tokens), cache, cache_bytes(cache))
        with self._lock:
            for ident, (kind, other, _) in list(self._entries.items()):
                if kind != "prefix" or other.media != media:
                    continue
                shared = common_prefix(other.tokens, entry.tokens)
                if shared == len(entry.tokens):
                    self._entries.move_to_end(ident)
                    return
                if shared == len(other.tokens):
                    del self._entries[ident]
            self._add("prefix", entry, entry.nbytes)

    def stats(self) -> dict[str, int]:
        with self._lock:
            kinds = [kind for kind, _, _ in self._entries.values()]
            return {"prefixes": kinds.count("prefix"), "frames": kinds.count("frames"),
                    "features": kinds.count("features"), "bytes": self.nbytes,
                    "hits": self.hits, "misses": self.misses}
