"""A city's chart: issued, redeemed and available over time, bucketed from the city's entries in the journal's latest
window and drawn as an SVG on the server (no script, no library). Pure functions: no I/O.

The figures are exact, not sampled: the last point is the city's report now (issued, redeemed, and available, the
balance of its budget accounts), and each earlier point is that minus what the entries after it added; the first
point is the value before the window's first entry of the city. So every point is what the reports said once every
entry up to it had been journaled.
"""
from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple

SERIES: Final = ("issued", "redeemed", "available")
# Colour and dash per series: the lines differ by more than colour (WCAG 1.4.1), and each colour has at least 4.5:1
# contrast on white.
_STROKES: Final = {"issued": ("#1d4f91", ""), "redeemed": ("#9a4a00", "8 4"), "available": ("#1e6b2a", "2 3")}
_WIDTH: Final = 760
_HEIGHT: Final = 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 110, 20, 40, 50


class Delta(NamedTuple):
    occurred_at: dt.datetime
    issued: int
    redeemed: int
    available: int


class Point(NamedTuple):
    at: dt.datetime
    issued: int
    redeemed: int
    available: int


def points(now: tuple[int, int, int], deltas: Sequence[Delta], buckets: int) -> list[Point]:
    """The chart's points, oldest first: the value before the first delta, then the value at the end of each of
    `buckets` equal time slices from the earliest delta's time to the latest (`now` is the value after every delta:
    (issued, redeemed, available)). No delta: no points."""
    assert buckets >= 1
    if not deltas:
        return []
    start = min(d.occurred_at for d in deltas)
    end = max(d.occurred_at for d in deltas)
    span = (end - start).total_seconds()
    slices = buckets if span > 0 else 1
    added = [[0, 0, 0] for _ in range(slices)]
    for d in deltas:
        k = min(slices - 1, int((d.occurred_at - start).total_seconds() / span * slices)) if span > 0 else 0
        added[k][0] += d.issued
        added[k][1] += d.redeemed
        added[k][2] += d.available
    value = [now[i] - sum(a[i] for a in added) for i in range(3)]
    out = [Point(start, *value)]
    for k, a in enumerate(added):
        value = [value[i] + a[i] for i in range(3)]
        out.append(Point(start + dt.timedelta(seconds=span * (k + 1) / slices), *value))
    assert tuple(value) == tuple(now), (value, now)
    return out


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def svg(chart: Sequence[Point], money: Callable[[int], str], title: str) -> str:
    """The points as an SVG line chart (role img, with a title and a description that say what it shows)."""
    if not chart:
        return ""
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    top = max(1, max(max(p.issued, p.redeemed, p.available) for p in chart))
    bottom = min(0, min(min(p.issued, p.redeemed, p.available) for p in chart))
    t0, t1 = chart[0].at, chart[-1].at
    span = (t1 - t0).total_seconds() or 1.0

    def x(p: Point) -> float:
        return _LEFT + plot_w * (p.at - t0).total_seconds() / span

    def y(v: int) -> float:
        return _TOP + plot_h * (top - v) / (top - bottom)

    last = chart[-1]
    desc = (f"From {t0.isoformat(timespec='seconds')} to {t1.isoformat(timespec='seconds')}: issued "
            f"{money(chart[0].issued)} to {money(last.issued)}, redeemed {money(chart[0].redeemed)} to "
            f"{money(last.redeemed)}, available {money(chart[0].available)} to {money(last.available)}.")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="chart" role="img" viewBox="0 0 {_WIDTH} {_HEIGHT}" '
             f'width="{_WIDTH}" height="{_HEIGHT}" aria-labelledby="chart-title chart-desc">',
             f'<title id="chart-title">{_e(title)}</title><desc id="chart-desc">{_e(desc)}</desc>',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fbfcfd" stroke="#8a94a0"/>']
    for v in sorted({top, bottom, (top + bottom) // 2}):
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#d5dae0"/>'
                     f'<text x="{_LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="12" '
                     f'fill="#1b1f24">{_e(money(v))}</text>')
    parts.append(f'<text x="{_LEFT}" y="{_HEIGHT - 28}" font-size="12" fill="#1b1f24">'
                 f'{_e(t0.isoformat(timespec="seconds"))}</text>'
                 f'<text x="{_LEFT + plot_w}" y="{_HEIGHT - 28}" font-size="12" text-anchor="end" fill="#1b1f24">'
                 f'{_e(t1.isoformat(timespec="seconds"))}</text>')
    for n, name in enumerate(SERIES):
        colour, dash = _STROKES[name]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        line = " ".join(f"{x(p):.1f},{y(getattr(p, name)):.1f}" for p in chart)
        parts.append(f'<polyline data-series="{name}" points="{line}" fill="none" stroke="{colour}" '
                     f'stroke-width="2.5"{dashed}/>')
        lx = _LEFT + n * 170
        parts.append(f'<line x1="{lx}" x2="{lx + 30}" y1="18" y2="18" stroke="{colour}" stroke-width="2.5"{dashed}/>'
                     f'<text x="{lx + 36}" y="22" font-size="13" fill="#1b1f24">{name}</text>')
    parts.append("</svg>")
    return "".join(parts)
