"""Time budgets: parsing durations (planning from measured throughput lands with the budget issue)."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def parse_duration(text: str | float | int) -> float:
    """Seconds for '90s', '20m', '2h', '1h30m', or a bare number of hours as LightLM takes
    it ('0.001' = 3.6 s). Raises ValueError on anything else or a non-positive duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 3600
    else:
        cleaned = str(text).strip().lower().replace(" ", "")
        try:
            seconds = float(cleaned) * 3600
        except ValueError:
            parts = re.fullmatch(r"((?:\d+(?:\.\d+)?(?:s|sec|m|min|h|hr))+)", cleaned)
            if not parts:
                raise ValueError(f"cannot read {text!r} as a duration; use e.g. 90s, 20m, 2h, 1h30m "
                                 f"or hours as a number (0.001)") from None
            seconds = sum(float(value) * _UNITS[unit]
                          for value, unit in re.findall(r"(\d+(?:\.\d+)?)(sec|min|hr|s|m|h)", cleaned))
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"duration {text!r} must be positive and finite")
    return seconds
