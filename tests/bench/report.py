"""Figures as text: median (min–max) over the samples, ratios per repetition pair, Markdown tables."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Unit = tuple[str, float, int]  # (suffix, divisor from the stored unit, decimals)

SECONDS: Unit = ("s", 1.0, 2)
MILLIS: Unit = ("ms", 1e-3, 1)
MEGABYTES: Unit = ("MB", 1e6, 0)
KIBIBYTES: Unit = ("KiB", 1024.0, 1)
PER_SECOND: Unit = ("req/s", 1.0, 0)
FACTOR: Unit = ("×", 1.0, 2)


@dataclass(frozen=True, slots=True)
class Summary:
    median: float
    low: float
    high: float
    n: int


def summarize(samples: Sequence[float | None]) -> Summary | None:
    values = [v for v in samples if v is not None and not math.isnan(v)]
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def paired_ratios(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float | None]:
    """ours[i] / theirs[i] for each repetition where both were measured."""
    return [a / b if a is not None and b is not None and b != 0 else None for a, b in zip(ours, theirs, strict=False)]


def _number(value: float, unit: Unit) -> str:
    suffix, divisor, decimals = unit
    scaled = value / divisor
    if abs(scaled) >= 100 and decimals > 0 and suffix not in {"×", "s"}:
        decimals = 0
    return f"{scaled:,.{decimals}f}"


def cell(summary: Summary | None, unit: Unit, *, why_missing: str = "not measured") -> str:
    """`0.85 s (0.80–0.91)`; a single sample prints alone."""
    if summary is None:
        return why_missing
    suffix = f" {unit[0]}" if unit[0] and unit[0] != "×" else unit[0]
    text = _number(summary.median, unit) + suffix
    if summary.n > 1:
        text += f" ({_number(summary.low, unit)}–{_number(summary.high, unit)})"
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded for reading in a terminal."""
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])
