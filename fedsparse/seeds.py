"""Every seed of a run is derived from the run's seed and names: nothing depends on the
order in which things happen, so a round can be replayed (resume) or run elsewhere
(a simulated client) with the same draws."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes (SHA-256, not ``hash``)."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
