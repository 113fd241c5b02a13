"""The per-process memos (``fedsparse.caches.ProcessCache``): bounded, least recently used
out first, one object each, all of them emptied by one call."""

from __future__ import annotations

import threading

import pytest

from fedsparse.caches import ProcessCache


def test_least_recently_used_goes_first_and_the_bound_holds() -> None:
    cache: ProcessCache[int] = ProcessCache("test", 2)
    made = []
    make = lambda k: (lambda: made.append(k) or k * 10)  # noqa: E731
    assert cache.get_or_make(1, make(1)) == 10 and cache.get_or_make(2, make(2)) == 20
    assert cache.get_or_make(1, make(1)) == 10 and made == [1, 2]  # a hit makes nothing
    cache.put(3, 30)  # 2 is the least recently used: it goes
    assert len(cache) == 2 and cache.get(2) is None and cache.get(1) == 10 and cache.get(3) == 30
    with pytest.raises(ValueError, match="size >= 1"):
        ProcessCache("bad", 0)


def test_threads_share_it_and_clear_all_empties_every_cache() -> None:
    cache: ProcessCache[int] = ProcessCache("threads", 64)

    def work(offset: int) -> None:
        for i in range(500):
            cache.get_or_make((offset + i) % 100, lambda: i)

    threads = [threading.Thread(target=work, args=(n * 7,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 64
    from fedsparse.data import partition
    from fedsparse import protocol, task

    owned = {partition._PARTITIONS, protocol._HEADERS, task._WHOLE, task._WHOLE_KEYS, cache}
    assert owned <= set(ProcessCache.instances)
    ProcessCache.clear_all()
    assert all(len(c) == 0 for c in owned)
