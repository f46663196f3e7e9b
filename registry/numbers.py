"""Numbers shown to people: durations, sizes, counts, percentages, each the one way the registry writes them.

The card's and the catalog's templates use these as filters (card.NUMBER_FILTERS); the smoke run's
estimate uses `human_seconds`. Nothing here imports another registry module.
"""

from __future__ import annotations

import math
from typing import Any


def human_size(value: Any) -> str:
    """Bytes in binary units, to three significant digits: 512 B, 121 KiB, 3.47 GiB."""
    size = float(value)
    if not math.isfinite(size) or abs(size) < 1024:
        return f"{size:.0f} B" if math.isfinite(size) else "n/a"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        # Decided on the rounded value, so 1023.9 KiB reads 1.00 MiB rather than 1020 KiB.
        if abs(float(_significant(size, 3))) < 1024 or unit == "TiB":
            return f"{_significant(size, 3)} {unit}"
    raise AssertionError("unreachable")


def human_seconds(value: Any) -> str:
    """A duration to two significant digits, in the unit a reader expects: 0.43 s, 12 s, 1.3 min, 2.5 h."""
    seconds = float(value)
    if not math.isfinite(seconds):
        return "n/a"
    if abs(float(_significant(seconds))) < 60:
        return f"{_significant(seconds)} s"
    # At least 1.0 in the larger unit: 59.7 s rounds up to 60 s, which reads 1.0 min.
    minutes = max(seconds / 60, 1.0)
    if float(_significant(minutes)) < 60:
        return f"{_significant(minutes)} min"
    return f"{_significant(max(seconds / 3600, 1.0))} h"


def human_count(value: Any) -> str:
    """An integer with thousands separators: 131,072."""
    return f"{int(value):,}"


def human_percent(value: Any) -> str:
    """A fraction as a percentage to three significant digits: 0.5 -> 50%, 1/3 -> 33.3%."""
    percent = float(value) * 100
    return f"{percent:.3g}%" if abs(percent) < 1000 else f"{percent:.0f}%"


def human_number(value: Any, digits: int = 3) -> str:
    """A float with `digits` decimals (an NLL: 1.873)."""
    return f"{float(value):.{digits}f}"


def _significant(value: float, digits: int = 2) -> str:
    """`value` rounded to `digits` significant digits, written without an exponent: 0.0043, 4.3, 43, 430."""
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - exponent)
    rounded = round(value, decimals)
    # Rounding can carry into a new leading digit (9.96 -> 10.0), which then needs one decimal less.
    if rounded and math.floor(math.log10(abs(rounded))) > exponent:
        decimals = max(0, decimals - 1)
    return f"{rounded:.{decimals}f}"
