"""The auditor's web page: public aggregate figures equal to the report API, the signed checkpoint, how to verify;
rendered by a real browser (headless Chromium) to a screenshot under .run/."""
from __future__ import annotations

import base64
import datetime as dt
import html.parser
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from schemas.ledger import CityReport
from services.ledger import merkle, page
from tests.harness import ROOT, eventually
from tests.test_audit_log import get_text, journaled, mint_many, open_checkpoint, signed_at_least

SCREENSHOT = ROOT / ".run" / "auditor-page.png"
WINDOW = (1280, 1600)
CHROMIUM_TIMEOUT_S = 120


class PageParser(html.parser.HTMLParser):
    """The figures (by city and year, and program when it is not `default`, and by column), the texts of elements
    with an id, and the links of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[tuple, dict[str, int]] = {}
        self.texts: dict[str, str] = {}
        self.links: list[str] = []
        self._row: tuple | None = None
        self._id: str | None = None
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "data-city" in a:
            self._row = (a["data-city"], int(a["data-year"]))
            if a["data-program"] != "default":
                self._row += (a["data-program"],)
            self.figures[self._row] = {}
        if tag == "td" and self._row and "data-column" in a:
            self.figures[self._row][a["data-column"]] = int(a["data-fen"])
        if tag == "a":
            self.links.append(a["href"])
        if "id" in a:
            self._id = a["id"]
            self.texts[self._id] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag in ("pre", "strong", "table"):
            self._id = None

    def handle_data(self, data):
        if self._id is not None:
            self.texts[self._id] += data


async def open_page(api, url: str) -> PageParser:
    r = await api.call("GET", f"{url}/")
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].startswith("text/html"), r.headers["Content-Type"]
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    parser = PageParser()
    parser.feed(r.body)
    assert "script" not in parser.tags
    return parser


async def test_the_public_page_shows_each_citys_figures_as_the_report_api_does(world_factory, api):
    w = await world_factory(10**9)
    vouchers = await mint_many(api, w, 6, amount=500)
    await w.redeemable(vouchers[0])
    assert (await w.redeem(vouchers[0], 120)).status == 201

    async def settled():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.body if r.status == 200 and r.body["issued"] == 3000 and r.body["redeemed"] == 120 else None
    report = await eventually(settled)
    await signed_at_least(api, w, await journaled(api, w, 6))

    parsed = await open_page(api, w.ledger)   # no token: the page is public
    assert parsed.figures[(w.city, w.year)] == {c: report[c] for c in page.REPORT_COLUMNS}
    # The checkpoint shown is a note signed by the key shown, which is the key served.
    key = await get_text(api, f"{w.ledger}/v1/log/key")
    assert parsed.texts["verifier-key"].strip() == key.strip()
    _, signed, root = open_checkpoint(parsed.texts["checkpoint"], key)
    assert signed >= 7

    # The recent entries link to inclusion proofs that verify against that checkpoint (with an auditor's token).
    proofs = [link for link in parsed.links if link.startswith("/v1/proofs/inclusion?")]
    assert proofs, parsed.links
    for link in proofs[:5]:
        r = await api.call("GET", f"{w.ledger}{link}", token=w.auditor)
        assert r.status == 200, r.body
        assert r.body["tree_size"] == signed
        merkle.verify_inclusion(r.body["index"], signed, base64.b64decode(r.body["leaf_hash"]),
                                [base64.b64decode(h) for h in r.body["path"]], root)
    assert {"/v1/log/key", "/v1/checkpoint"} <= set(parsed.links)


async def test_a_report_is_per_program_and_the_default_program_is_the_citys_first_budget(world_factory, api):
    w = await world_factory(10**9)
    base = f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}"

    async def journaled():
        r = await api.call("GET", base, token=w.auditor)
        return r.body if r.status == 200 and r.body["budget"] == 10**9 else None
    report = await eventually(journaled)
    assert (report["program"], report["carried_in"], report["carried_out"]) == ("default", 0, 0)
    assert (await api.call("GET", f"{base}?program=default", token=w.auditor)).body == report
    missing = await api.call("GET", f"{base}?program=model", token=w.auditor)
    assert missing.status == 404 and "program model" in missing.body["detail"], missing.body
    for bad in ("Model", "-model", "m" * 64, ""):
        r = await api.call("GET", f"{base}?program={bad}", token=w.auditor)
        assert r.status == 422 and r.body["field"] == "program", (bad, r.body)
    # The program's accounts have names of their own; `default` is never spelled out.
    r = await api.call("GET", f"{w.ledger}/v1/accounts/budget:{w.city}:{w.year}:model", token=w.auditor)
    assert r.status == 404, r.body
    r = await api.call("GET", f"{w.ledger}/v1/accounts/budget:{w.city}:{w.year}:default", token=w.auditor)
    assert r.status == 422 and r.body["field"] == "account", r.body


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed image data) of a PNG."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", raw[16:24])
    data, at = b"", 8
    while at < len(raw):
        (length,) = struct.unpack(">I", raw[at:at + 4])
        kind = raw[at + 4:at + 8]
        if kind == b"IDAT":
            data += raw[at + 8:at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(data)))


async def test_the_page_renders_in_headless_chromium(world_factory, api):
    w = await world_factory(10**9)
    await mint_many(api, w, 3)
    await signed_at_least(api, w, await journaled(api, w, 3))
    installed = subprocess.run(["bash", str(ROOT / "deploy" / "chromium.sh"), "ensure"], capture_output=True,
                               text=True, timeout=1800)
    assert installed.returncode == 0, installed.stderr
    chromium = installed.stdout.strip().splitlines()[-1]
    SCREENSHOT.unlink(missing_ok=True)
    profile = tempfile.mkdtemp(prefix="cvl-chromium-")
    try:
        run = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={SCREENSHOT}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}", f"{w.ledger}/"],
            capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert SCREENSHOT.exists(), run.stdout + run.stderr
    width, height, values = png_size_and_colours(SCREENSHOT)
    assert (width, height) == WINDOW
    assert SCREENSHOT.stat().st_size > 20_000, "a page of tables and text, not a blank screen"
    assert values > 50, "more than a blank or single-colour screen"


def test_everything_on_the_page_is_escaped():
    hostile = "<script>alert(1)</script>&\"'"
    report = CityReport(city=hostile, year=2026, budget=10, issued=3, redeemed=1, refunded=0, revoked=0,
                        expired=0, outstanding=2, available=7)
    # A program's row, with a carry out of 2026 and into 2027 (ids are validated upstream; escaped here anyway).
    program = CityReport(city=hostile, year=2026, program=hostile, budget=10, issued=3, redeemed=1, refunded=0,
                         revoked=0, expired=2, outstanding=0, available=7, carried_out=2)
    carried = CityReport(city=hostile, year=2027, program=hostile, budget=2, issued=0, redeemed=0, refunded=0,
                         revoked=0, expired=0, outstanding=0, available=2, carried_in=2)
    now = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    text = page.render(page.PageData(
        reports=[report, program, carried], reports_truncated=False, journal_size=2,
        checkpoint=page.PageCheckpoint(1, f"{hostile}\n1\nAAAA\n\n\u2014 x y\n", now),
        entries=[page.PageEntry(0, hostile, now, bytes(32)), page.PageEntry(1, "VoucherMinted", now, bytes(32))],
        verifier_key=hostile, base_url=hostile))
    assert "<script" not in text and hostile not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in text
    parser = PageParser()
    parser.feed(text)
    assert parser.figures == {(hostile, 2026): {c: getattr(report, c) for c in page.REPORT_COLUMNS},
                              (hostile, 2026, hostile): {c: getattr(program, c) for c in page.REPORT_COLUMNS},
                              (hostile, 2027, hostile): {c: getattr(carried, c) for c in page.REPORT_COLUMNS}}
