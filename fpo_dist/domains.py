"""Domains of numeric settings: the interval a hyper-parameter must lie in, checked before any work.

A loss's registry entry declares one :class:`Interval` per numeric hyper-parameter (``fpo_dist.losses``); the
optimizer and the run's other numeric settings declare theirs in ``fpo_dist.config``.  A value outside its domain
(or not finite) is one :class:`~fpo_dist.errors.ConfigError` naming the key, the value and the domain — a negative β
or α would otherwise train the inverted objective without a word.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fpo_dist.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A real interval; ``None`` ends are unbounded; finite values only."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: object) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return self.high is None or (x < self.high if self.high_open else x <= self.high)

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return "any finite number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Interval(0, low_open=True)
NON_NEGATIVE = Interval(0)
AT_LEAST_ONE = Interval(1)
UNIT_OPEN_RIGHT = Interval(0, 1, high_open=True)  # [0, 1): Adam's betas, dropout
ANY = Interval()


def check(key: str, value: object, domain: Interval, why: str = "") -> None:
    """Raise :class:`ConfigError` (one line: key, value, domain, why) unless ``value`` lies in ``domain``."""
    if value not in domain:
        raise ConfigError(f"'{key}' is {value!r}, outside its domain: it must be {domain}{f' ({why})' if why else ''}")
