"""One least-recently-used map, bounded by count or by bytes, safe across threads.

Worker processes keep several things between tasks (open arrays, models,
unpickled payloads, blocks' factors); each is one :class:`LRU`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable


class LRU[K: Hashable, V]:
    """A map that forgets its least recently used items beyond a bound.

    Args:
        max_items: most items kept (``None``: no count bound).
        max_bytes: most bytes kept, summing the sizes given to :meth:`put`
            (``None``: no byte bound). An item larger than the bound is not kept.

    Example:
        >>> c = LRU(max_items=2)
        >>> c.put("a", 1); c.put("b", 2); _ = c.get("a"); c.put("c", 3)
        >>> sorted(c.keys())
        ['a', 'c']
    """

    def __init__(
        self, max_items: int | None = None, max_bytes: float | None = None
    ) -> None:
        """An empty map with these bounds."""
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.nbytes = 0

    def get(self, key: K) -> V | None:
        """The value under ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(
        self, key: K, value: V, nbytes: int = 0, max_bytes: float | None = None
    ) -> None:
        """Keep ``value`` (an existing key keeps its value); evict beyond the bounds.

        ``max_bytes`` overrides the map's byte bound for this call.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        with self._lock:
            if key in self._items or (limit is not None and nbytes > limit):
                return
            self._items[key] = (value, nbytes)
            self.nbytes += nbytes
            while self._items and (
                (self.max_items is not None and len(self._items) > self.max_items)
                or (limit is not None and self.nbytes > limit)
            ):
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value under ``key``, made (under the lock) and kept if absent."""
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item[0]
            value = make()
            self.put(key, value)
            return value

    def forget(self, which: Callable[[K], bool]) -> None:
        """Drop every item whose key satisfies ``which``."""
        with self._lock:
            for key in [k for k in self._items if which(k)]:
                self.nbytes -= self._items.pop(key)[1]

    def keys(self) -> list[K]:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        """Drop everything."""
        with self._lock:
            self._items.clear()
            self.nbytes = 0

    def __len__(self) -> int:
        """Items kept."""
        return len(self._items)
