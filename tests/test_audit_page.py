"""The auditor's web page: public aggregate figures (in yuan) equal to the report API, the signed checkpoint and its
history, how to verify; in a real browser (headless Chromium, driven through its DevTools protocol): the checks of
the checkpoint's signature and of an inclusion proof that its one script makes, axe-core's accessibility rules, and a
screenshot under .run/."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html.parser
import json
import struct
import zlib
from pathlib import Path

from schemas.ledger import CityReport
from services.ledger import merkle, page
from tests import browser
from tests.harness import ROOT, eventually
from tests.test_audit_log import get_text, journaled, mint_many, open_checkpoint, signed_at_least

SCREENSHOT = ROOT / ".run" / "auditor-page.png"
CITY_SCREENSHOT = ROOT / ".run" / "city-page.png"
SMALL_SCREENSHOT = ROOT / ".run" / "auditor-page-small.png"
WINDOW = browser.WINDOW


class PageParser(html.parser.HTMLParser):
    """The figures (by city and year, and program when it is not `default`, and by column), the texts of elements
    with an id, and the links of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[tuple, dict[str, int]] = {}
        self.texts: dict[str, str] = {}
        self.links: list[str] = []
        self.scripts: list[dict] = []
        self.script_text = ""
        self._in_script = False
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
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True
        if "id" in a:
            self._id = a["id"]
            self.texts[self._id] = ""

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag in ("pre", "strong", "table", "code", "h1", "p", "svg"):
            self._id = None
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data
        if self._id is not None:
            self.texts[self._id] += data


async def open_page(api, url: str) -> PageParser:
    r = await api.call("GET", f"{url}/")
    assert r.status == 200, r.body
    assert r.headers["Content-Type"].startswith("text/html"), r.headers["Content-Type"]
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    parser = PageParser()
    parser.feed(r.body)
    # One script, our static file, loaded from this origin; no inline script (the CSP would refuse it anyway).
    assert parser.scripts == [{"src": page.SCRIPT_PATH, "defer": None}] and not parser.script_text.strip()
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
    size = await journaled(api, w, 6)   # the batch of 6 is one entry (VouchersMinted)
    await signed_at_least(api, w, size)

    parsed = await open_page(api, w.ledger)   # no token: the page is public
    assert parsed.figures[(w.city, w.year)] == {c: report[c] for c in page.REPORT_COLUMNS}
    # The checkpoint shown is a note signed by the key shown, which is the key served.
    key = await get_text(api, f"{w.ledger}/v1/log/key")
    assert parsed.texts["verifier-key"].strip() == key.strip()
    _, signed, root = open_checkpoint(parsed.texts["checkpoint"], key)
    assert signed >= size

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


def another_key(key: str) -> str:
    """A C2SP verifier key with the name of `key` and a fresh Ed25519 public key (its key id computed as it should)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    name = key.strip().split("+")[0]
    raw = b"\x01" + Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    return f"{name}+{key_id.hex()}+{base64.b64encode(raw).decode()}"


async def axe_clean(tab: browser.Page, axe_source: str, what: str) -> None:
    violations = await tab.axe_violations(axe_source)
    failing = [v for v in violations if v["impact"] in browser.AXE_FAILING_IMPACTS]
    assert failing == [], f"{what}: " + json.dumps(failing, indent=1)


async def test_in_headless_chromium_the_page_checks_the_signature_and_a_proof_passes_axe_and_is_shot(world_factory,
                                                                                                      api):
    w = await world_factory(10**9)
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}", token=w.admin, json={"name": "Wuxi", "currency": "CNY"})
    assert r.status == 200, r.body
    vouchers = await mint_many(api, w, 3, amount=123_456)
    await w.redeemable(vouchers[0])
    assert (await w.redeem(vouchers[0], 100_000)).status == 201
    _, signed, _, key = await signed_at_least(api, w, await journaled(api, w, 3) + 1)
    axe_source = Path(browser.ensure_tool("axe.sh")).read_text()
    SCREENSHOT.unlink(missing_ok=True)
    CITY_SCREENSHOT.unlink(missing_ok=True)
    async with browser.chromium(api.session) as tab:
        await tab.open(f"{w.ledger}/")
        # The script ran: the forms it drives are shown; every figure was there before it.
        await tab.until("!document.getElementById('check-signature').hidden")
        assert await tab.js("document.getElementById('signature-result').textContent") == ""

        async def check(form: str, result: str) -> str:
            await tab.js(f"document.getElementById('{result}').textContent = ''; "
                         f"document.getElementById('{form}').requestSubmit(); true")
            return await tab.until(f"document.getElementById('{result}').textContent")

        # A key the auditor did not get from us: refused, named.
        other = key.strip().replace(key.strip().split("+")[0], "someone.else", 1)
        await tab.js(f"document.getElementById('pinned-key').value = {json.dumps(other)}; true")
        assert "does not match" in await check("check-signature", "signature-result")
        # A well-formed key of the log's name that is not the log's: no signature by it.
        await tab.js(f"document.getElementById('pinned-key').value = {json.dumps(another_key(key))}; true")
        assert "no signature by this key" in await check("check-signature", "signature-result")
        # The pinned key: the latest checkpoint verifies (it may be newer than the one the page was rendered with).
        await tab.js(f"document.getElementById('pinned-key').value = {json.dumps(key.strip())}; true")
        verified = await check("check-signature", "signature-result")
        assert verified.startswith("Verified: the checkpoint of ") and "is signed by the key you pinned" in verified
        # An entry's inclusion proof against that checkpoint's root, with an auditor's token; a wrong token fails.
        await tab.js(f"document.getElementById('entry-index').value = '{signed - 1}';"
                     "document.getElementById('auditor-token').value = 'not-a-token'; true")
        assert "answered 401" in await check("check-inclusion", "inclusion-result")
        await tab.js(f"document.getElementById('auditor-token').value = {json.dumps(w.auditor)}; true")
        included = await check("check-inclusion", "inclusion-result")
        assert included.startswith(f"Verified: entry {signed - 1} (") and "whose root the checkpoint signs." in included
        await tab.js("document.getElementById('entry-index').value = '0'; true")
        assert (await check("check-inclusion", "inclusion-result")).startswith("Verified: entry 0 (")
        await axe_clean(tab, axe_source, "the auditor's page")
        await tab.screenshot(SCREENSHOT)
        await tab.screenshot(SMALL_SCREENSHOT, scale=0.5)   # docs/auditor-page.png is one of these

        # A browser whose WebCrypto lacks Ed25519 is told so, not shown a failure of the log.
        await tab.js("crypto.subtle.generateKey = () => Promise.reject(new DOMException('no', 'NotSupportedError'));"
                     "true")
        assert "lacks Ed25519" in await check("check-signature", "signature-result")

        await tab.open(f"{w.ledger}/cities/{w.city}")
        assert await tab.js("document.querySelectorAll('#chart polyline').length") == 3, \
            await tab.js("document.body.innerText")
        await axe_clean(tab, axe_source, "a city's page")
        await tab.screenshot(CITY_SCREENSHOT)
    for shot in (SCREENSHOT, CITY_SCREENSHOT):
        width, height, values = png_size_and_colours(shot)
        assert (width, height) == WINDOW
        assert shot.stat().st_size > 20_000, "a page of tables and text, not a blank screen"
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
        verifier_key=hostile, base_url=hostile,
        checkpoints=[page.PageCheckpointRow(0, 1, bytes(32), now, 0)], names={hostile: page.CityName(hostile, "CNY")}))
    # The page's one script tag is ours, and nothing else opens one.
    assert text.count("<script") == 1 and f'<script src="{page.SCRIPT_PATH}" defer></script>' in text
    assert hostile not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#x27;" in text
    parser = PageParser()
    parser.feed(text)
    assert parser.figures == {(hostile, 2026): {c: getattr(report, c) for c in page.REPORT_COLUMNS},
                              (hostile, 2026, hostile): {c: getattr(program, c) for c in page.REPORT_COLUMNS},
                              (hostile, 2027, hostile): {c: getattr(carried, c) for c in page.REPORT_COLUMNS}}
