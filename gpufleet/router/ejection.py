"""Passive outlier ejection of one pod: consecutive failures take it out of rotation.

An ejected pod sits out a cool-down (doubling on each repeated ejection, up to a cap);
after it, the pod is back only once a contact succeeds (a poll or a request), and a
failure on probation ejects it again at once. Time is passed in, so tests never sleep.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Outlier:
    threshold: int
    cooldown_s: float
    cooldown_max_s: float
    failures: int = 0  # consecutive, while admitted
    ejections: int = 0  # consecutive ejections, for the back-off
    ejected_until: float | None = None  # None while admitted
    last_error: str | None = None

    @property
    def admitted(self) -> bool:
        return self.ejected_until is None

    def failure(self, now: float, error: str = "") -> bool:
        """Count a failure; True when it ejects the pod."""
        self.last_error = error or self.last_error
        if self.ejected_until is not None:
            if now >= self.ejected_until:  # failed on probation: sit out longer
                self._eject(now)
                return True
            return False
        self.failures += 1
        if self.failures >= self.threshold:
            self._eject(now)
            return True
        return False

    def success(self, now: float) -> bool:
        """Count a success; True when it re-admits the pod."""
        if self.ejected_until is None:
            self.failures = 0
            self.ejections = 0
            return False
        if now >= self.ejected_until:
            self.ejected_until = None
            self.failures = 0
            return True
        return False

    def _eject(self, now: float) -> None:
        self.ejected_until = now + min(self.cooldown_max_s, self.cooldown_s * 2**self.ejections)
        self.ejections += 1
        self.failures = 0


@dataclass(frozen=True)
class EjectionPolicy:
    """The settings every pod's ``Outlier`` is made with."""

    threshold: int = 3
    cooldown_s: float = 10.0
    cooldown_max_s: float = 120.0

    def new(self) -> Outlier:
        return Outlier(self.threshold, self.cooldown_s, self.cooldown_max_s)
