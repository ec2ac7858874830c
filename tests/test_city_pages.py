"""A city's public page: its name (from its latest CitySet), its reports per program and year in yuan equal to the
report API, its recent entries, and a chart of issued / redeemed / available whose points are exact; rendered at
most once per second per path; and the pure parts (yuan, the chart's points, the public URL, escaping)."""
from __future__ import annotations

import asyncio
import datetime as dt
import random
import re

import pytest

from schemas.ledger import CityReport
from services.common.settings import Settings
from services.ledger import chart, page
from services.ledger.app import PageCaches, public_url
from tests.harness import eventually
from tests.test_audit_page import PageParser, open_page
from tests.test_audit_log import mint_many
from tests.test_rate_limits import burst, metric

NAME = "Wuxi (Binhu district)"


async def city_page(api, w) -> tuple[PageParser, str]:
    r = await api.call("GET", f"{w.ledger}/cities/{w.city}")   # no token: public
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    parsed = PageParser()
    parsed.feed(r.body)
    assert parsed.scripts == [], "a city's page has no script"
    return parsed, r.body


def rows(body: str, table: str) -> list[dict[str, int]]:
    """The data-fen cells of each row of table `table`, in order."""
    class Rows(PageParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows = False, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "table":
                self.inside = a.get("id") == table
            if self.inside and tag == "tr" and "data-at" in a:
                self.rows.append({})
            if self.inside and tag == "td" and "data-fen" in a and self.rows:
                self.rows[-1][a["data-column"]] = int(a["data-fen"])
    parser = Rows()
    parser.feed(body)
    return parser.rows


async def test_a_city_page_shows_its_name_its_programs_its_entries_and_an_exact_chart(world_factory, api):
    w = await world_factory(10**9)
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}", token=w.admin, json={"name": NAME, "currency": "CNY"})
    assert r.status == 200, r.body
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/programs/model", token=w.admin,
                       json={"name": "model vouchers", "kind": "model"})
    assert r.status == 200, r.body
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/programs/model/budgets/{w.year}", token=w.admin,
                       json={"amount": 5 * 10**8})
    assert r.status == 200, r.body
    vouchers = await mint_many(api, w, 4, amount=250_000)
    r = await w.mint(1_234_567, program="model")
    assert r.status == 201, r.body
    await w.redeemable(vouchers[0])
    assert (await w.redeem(vouchers[0], 99_999)).status == 201

    base = f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}"

    async def settled():
        d = await api.call("GET", base, token=w.auditor)
        m = await api.call("GET", f"{base}?program=model", token=w.auditor)
        ok = (d.status == m.status == 200 and d.body["issued"] == 10**6 and d.body["redeemed"] == 99_999
              and m.body["issued"] == 1_234_567)
        return (d.body, m.body) if ok else None
    default, model = await eventually(settled)

    async def named():
        parsed, body = await city_page(api, w)
        return (parsed, body) if NAME in parsed.texts.get("city-id", "") or f"<h1>{NAME} " in body else None
    parsed, body = await eventually(named)
    assert parsed.texts["city-id"] == w.city
    # Each program's report, figure for figure as the API has it (fen in the data, yuan on the screen).
    assert parsed.figures == {(w.city, w.year): {c: default[c] for c in page.REPORT_COLUMNS},
                              (w.city, w.year, "model"): {c: model[c] for c in page.REPORT_COLUMNS}}
    assert "¥10,000.00" in body and "¥12,345.67" in body and "¥999.99" in body   # issued, model issued, redeemed

    # The chart: from nothing (the window holds the city's whole life) to the reports now, issued never falling.
    points = rows(body, "chart-points")
    assert points[0] == {"issued": 0, "redeemed": 0, "available": 0}
    assert points[-1] == {"issued": 10**6 + 1_234_567, "redeemed": 99_999,
                          "available": default["available"] + model["available"]}
    assert all(a["issued"] <= b["issued"] for a, b in zip(points, points[1:]))
    assert body.count("<polyline") == 3

    # Its recent entries are the ones that touch its budgets and its vouchers, the redemption included.
    budget_entries = await api.call("GET", f"{w.ledger}/v1/accounts/budget:{w.city}:{w.year}/entries",
                                    token=w.auditor)
    assert budget_entries.status == 200, budget_entries.body
    shown = {int(i) for i in re.findall(r'<tr data-index="(\d+)">', body)}
    assert {e["index"] for e in budget_entries.body["entries"]} <= shown
    assert "VoucherRedeemed" in body and "VoucherMinted" in body and "BudgetSet" in body  # mint_many: single mints

    # The auditor's page names the city and links to its page; the commands show the ledger's URL.
    main = await open_page(api, w.ledger)
    assert f"/cities/{w.city}" in main.links

    async def main_named():
        r = await api.call("GET", f"{w.ledger}/")
        return r.body if f"{NAME} <span" in r.body else None
    assert f"cvl audit verify --url {w.ledger}" in await eventually(main_named)
    assert f"cvl audit verify --url {w.ledger}" in body


async def test_a_later_citys_name_replaces_the_earlier_and_an_unknown_city_is_404(world_factory, api):
    w = await world_factory(1000)
    for name in ("First name", "Second name"):
        r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}", token=w.admin,
                           json={"name": name, "currency": "CNY"})
        assert r.status == 200, r.body

    async def renamed():
        _, body = await city_page(api, w)
        return body if "<h1>Second name " in body else None
    assert "First name" not in await eventually(renamed)

    r = await api.call("GET", f"{w.ledger}/cities/no-such-city-{w.city}")
    assert r.status == 404 and r.headers["Content-Type"].startswith("text/html") and "No city" in r.body
    for bad in ("Wuxi", "-wuxi", "x" * 64):
        r = await api.call("GET", f"{w.ledger}/cities/{bad}")
        assert r.status == 422 and r.body["field"] == "city", (bad, r.body)


async def test_a_flood_of_a_citys_page_renders_it_at_most_once_per_second(world_factory, api):
    w = await world_factory(1000)

    async def journaled():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.status == 200
    await eventually(journaled)
    url = f"{w.ledger}/cities/{w.city}"
    before = metric((await api.call("GET", f"{w.ledger}/metrics")).body, "cvl_ledger_page_renders_total")
    replies = await burst(api, url, None, 200)
    after = metric((await api.call("GET", f"{w.ledger}/metrics")).body, "cvl_ledger_page_renders_total")
    assert {r.status for r in replies} == {200}
    assert len({r.body for r in replies}) <= 2
    assert after - before <= 2, (before, after)


# --- the pure parts ---------------------------------------------------------------------------------------------------

def test_amounts_are_shown_in_yuan():
    assert page.money(1_234_567) == "¥12,345.67"
    assert page.money(5) == "¥0.05" and page.money(0) == "¥0.00" and page.money(-100) == "\u2212¥1.00"
    assert page.money(10**12) == "¥10,000,000,000.00"
    assert page.money(12_345, "USD") == "123.45 USD"


def test_the_charts_points_are_exact_whatever_the_order_of_the_times():
    rng = random.Random(7)
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    deltas = [chart.Delta(t0 + dt.timedelta(seconds=rng.randrange(3600)), rng.randrange(1000), rng.randrange(100),
                          rng.randrange(-1000, 1000)) for _ in range(500)]
    now = (10**6, 10**5, 10**7)
    points = chart.points(now, deltas, 24)
    assert len(points) == 25 and tuple(points[-1][1:]) == now
    assert points[0][1:] == tuple(now[i] - sum(d[i + 1] for d in deltas) for i in range(3))
    # Each point is the start's value plus every delta up to its time.
    for p in points[1:-1]:
        assert p.issued == points[0].issued + sum(d.issued for d in deltas if d.occurred_at < p.at)
    assert [p.at for p in points] == sorted(p.at for p in points)
    # All at one instant: one slice; no delta: no chart.
    same = [chart.Delta(t0, 5, 1, -5), chart.Delta(t0, 7, 0, -7)]
    assert chart.points((12, 1, 88), same, 24) == [chart.Point(t0, 0, 0, 100), chart.Point(t0, 12, 1, 88)]
    assert chart.points(now, [], 24) == [] and chart.svg([], page.money, "x") == ""


def test_the_commands_show_the_public_url_not_the_bind_address():
    settings = Settings(service="ledger", host="0.0.0.0", port=8083, pg_dsn="", kafka_bootstrap="",
                        topic_issuing="", topic_redemption="", group_prefix="", run_dir=".")
    assert public_url(settings, None) == "http://0.0.0.0:8083"
    assert public_url(settings, "https://ledger.example.cn/") == "https://ledger.example.cn"
    assert public_url(settings, "http://10.1.2.3:8083") == "http://10.1.2.3:8083"
    for bad in ("ledger.example.cn", "ftp://x", "https://x/path", "https://a b"):
        with pytest.raises(ValueError):
            public_url(settings, bad)


async def test_the_page_caches_keep_a_bounded_number_of_paths():
    renders = []

    def render(path):
        async def go():
            renders.append(path)
            await asyncio.sleep(0)
            return path
        return go
    caches = PageCaches(paths_max=2)
    assert await asyncio.gather(*(caches.get("a", render("a")) for _ in range(20))) == ["a"] * 20
    assert [await caches.get(p, render(p)) for p in ("b", "a", "c", "a", "b")] == ["b", "a", "c", "a", "b"]
    # a, b rendered once each before c pushed b out (a was asked for since); b came back as a new path.
    assert renders == ["a", "b", "c", "b"]


def test_everything_on_a_citys_page_is_escaped():
    hostile = "<script>alert(1)</script>&\"'"
    now = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    report = CityReport(city=hostile, year=2026, program=hostile, budget=10, issued=3, redeemed=1, refunded=0,
                        revoked=0, expired=0, outstanding=2, available=7)
    data = page.CityPageData(
        city=hostile, name=page.CityName(hostile, "CNY"), reports=[report], reports_truncated=False,
        entries=[page.PageEntry(3, hostile, now, bytes(32))],
        chart=chart.points((3, 1, 7), [chart.Delta(now, 3, 1, -3)], 24), window_start=0, journal_size=4,
        signed_size=4, base_url=hostile)
    for text in (page.render_city(data), page.render_missing_city(hostile)):
        assert "<script" not in text and hostile not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in text
    parser = PageParser()
    parser.feed(page.render_city(data))
    assert parser.figures == {(hostile, 2026, hostile): {c: getattr(report, c) for c in page.REPORT_COLUMNS}}
