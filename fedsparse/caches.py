"""Per-process memos, owned by one kind of object.

A simulation worker (or a SuperNode's ClientApp process) serves many clients and rounds, so a
few results are kept in memory across them: partitions of the training set, parsed ``.npy``
headers, the whole split's features. Each is a ``ProcessCache``: bounded (least recently used
out first), safe to share between threads, named, and listed in ``ProcessCache.instances`` so
that ``clear_all`` empties every one of them (a test, or a process that changes its data).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, ClassVar, Generic, Hashable, TypeVar

V = TypeVar("V")


class ProcessCache(Generic[V]):
    """At most ``size`` values by key; ``get_or_make(key, make)`` computes a missing one."""

    instances: ClassVar[list["ProcessCache"]] = []

    def __init__(self, name: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"cache {name!r} needs a size >= 1, got {size}")
        self.name, self.size = name, size
        self._values: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()
        ProcessCache.instances.append(self)

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            value = self._values.get(key)
            if value is not None:
                self._values.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V) -> V:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, made (outside the lock: two threads may both make it) when absent."""
        value = self.get(key)
        return value if value is not None else self.put(key, make())

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    @classmethod
    def clear_all(cls) -> None:
        for cache in cls.instances:
            cache.clear()
