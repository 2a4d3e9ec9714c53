"""Result rows, the printed table and the JSON record of a run."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Target:
    """What the proxy's figure must meet: a ratio to the direct figure
    (`at_least`) or an absolute bound on the proxy's figure (`at_most`)."""

    ratio_at_least: float | None = None
    at_most: float | None = None
    below: float | None = None

    def text(self, unit: str) -> str:
        if self.ratio_at_least is not None:
            return f">= {self.ratio_at_least:g}x"
        if self.at_most is not None:
            return f"<= {self.at_most:g} {unit}"
        if self.below is not None:
            return f"< {self.below:g} {unit}"
        return ""

    def met(self, direct: float | None, proxy: float | None) -> bool | None:
        if proxy is None:
            return None
        if self.ratio_at_least is not None:
            return None if not direct else proxy / direct >= self.ratio_at_least
        if self.at_most is not None:
            return proxy <= self.at_most
        if self.below is not None:
            return proxy < self.below
        return None


@dataclasses.dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    direct: float | None
    proxy: float | None
    target: Target = dataclasses.field(default_factory=Target)

    @property
    def ratio(self) -> float | None:
        if self.direct in (None, 0) or self.proxy is None:
            return None
        return self.proxy / self.direct

    @property
    def met(self) -> bool | None:
        return self.target.met(self.direct, self.proxy)

    def as_dict(self) -> dict:
        return {
            "scenario": self.scenario,
            "metric": self.metric,
            "unit": self.unit,
            "direct": self.direct,
            "proxy": self.proxy,
            "ratio": self.ratio,
            "target": self.target.text(self.unit),
            "met": self.met,
        }


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    header = ("scenario", "metric", "direct", "amqplexd", "ratio", "target", "met")
    lines = [header]
    for row in rows:
        met = {True: "yes", False: "NO", None: ""}[row.met]
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        metric = f"{row.metric} ({row.unit})"
        lines.append(
            (
                row.scenario,
                metric,
                _num(row.direct),
                _num(row.proxy),
                ratio,
                row.target.text(row.unit),
                met,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
    }


def write_json(record: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
