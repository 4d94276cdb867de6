"""Is an object in the cluster still what we applied? (pure)

The API server adds defaults, status and bookkeeping to what it stores, so the question is
"is every field we set still set to our value", not equality. Lists must keep their
length: an env entry added or removed by hand counts as drift.
"""

from __future__ import annotations

import re
from decimal import Decimal, DecimalException
from typing import Any

_SUFFIXES: dict[str, Decimal | int] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


# A quantity's number (Kubernetes' grammar: digits, a point, an optional decimal exponent). Any other
# string is no quantity, also one Decimal would read: a hash such as "1234e56789012345" is a number
# with an exponent no arithmetic survives, and it must compare as the text it is.
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?")


def quantity(value: str) -> Decimal | None:
    """A Kubernetes quantity's value ("500m" -> 0.5, "1Gi" -> 1073741824), or None."""
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if value.endswith(suffix):
            number, factor = value[: -len(suffix)], Decimal(_SUFFIXES[suffix])
            break
    else:
        number, factor = value, Decimal(1)
    if not _NUMBER.fullmatch(number):
        return None
    try:
        return Decimal(number) * factor
    except DecimalException:
        return None


def _same_scalar(want: Any, have: Any) -> bool:
    if isinstance(want, bool) or isinstance(have, bool):  # True == 1 in Python, not in YAML
        return type(want) is type(have) and want == have
    if want == have:
        return True
    # The API server stores quantities in canonical form ("1000m" -> "1", 2 -> "2").
    if isinstance(want, str | int) and isinstance(have, str | int):
        a, b = quantity(str(want)), quantity(str(have))
        return a is not None and a == b
    return False


# Fields the API server does not store when false (Go `bool` with omitempty, not `*bool`):
# absent there means false. Only these: for a `*bool` absent means "the default", which
# may be true (automountServiceAccountToken, allowPrivilegeEscalation), so it is drift.
OMITTED_WHEN_FALSE = frozenset({"publishNotReadyAddresses"})


def drift(want: Any, have: Any, path: str = "") -> list[str]:
    """Paths where `have` does not carry what `want` says; empty means no drift."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in want.items():
            if value is False and key in OMITTED_WHEN_FALSE and key not in have:
                continue
            out.extend(drift(value, have.get(key), f"{path}.{key}"))
        return out
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return [path or "."]
        out = []
        for i, (w, h) in enumerate(zip(want, have, strict=True)):
            out.extend(drift(w, h, f"{path}[{i}]"))
        return out
    return [] if _same_scalar(want, have) else [path or "."]
