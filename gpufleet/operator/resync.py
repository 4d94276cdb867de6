"""When each ModelGroup is re-checked (pure): spread over the period, not all at once.

Each group gets a fixed phase in [0, period) from a hash of its uid, so a round of N groups
is N reconciles evenly spread, the same group comes back every period, and several
operators (or a restart) keep the same spread instead of starting in step.
"""

from __future__ import annotations

import hashlib


def phase(uid: str, period_s: float) -> float:
    """Seconds into each period at which the group with this uid is re-checked."""
    digest = hashlib.blake2b(uid.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 * period_s


def schedule(groups: list[tuple[str, str, str]], period_s: float) -> list[tuple[float, str, str]]:
    """(offset, namespace, name) of every (namespace, name, uid), in the order they are due."""
    return sorted((phase(uid or f"{ns}/{name}", period_s), ns, name) for ns, name, uid in groups)
