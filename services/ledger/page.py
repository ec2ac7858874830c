"""The auditor's web pages: `GET /` and a page per city (`GET /cities/{city}`), server-rendered HTML and CSS, every
value escaped, every figure on the page without script.

The pages are public: they show what is public-money information anyway — per city, year and program (voucher
scheme), the budget and what became of it, in yuan (from fen), under the city's name — plus the latest signed
checkpoint and the checkpoint history, the verifier key, and the most recent entries by index, type, time and leaf
hash only (no accounts, vouchers, providers or amounts of single entries). A city's page adds its reports by program
and year, its recent entries and a chart (chart.py) of issued, redeemed and available over time. Everything finer
stays behind the authenticated JSON API, including the entries' leaves and the inclusion proofs.

One small static script (static/audit.js, no framework) adds two checks in the browser on `GET /`: the latest
checkpoint's Ed25519 signature against a key the auditor pins, and an entry's inclusion proof (RFC 9162) against
that checkpoint's root, with WebCrypto; the page says so when the browser lacks Ed25519. The page works without it.
"""
from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple

from schemas.ledger import CityReport

from . import chart

REPORT_COLUMNS: Final = ("budget", "issued", "redeemed", "refunded", "revoked", "expired", "outstanding",
                         "available", "carried_in", "carried_out")

_STYLE: Final = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 80rem; padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccd; }
p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .4rem; border-bottom: 1px solid #e3e6ea; text-align: right; white-space: nowrap; }
#reports { font-size: 13.5px; } details { margin: .8rem 0; } summary { cursor: pointer; }
th { background: #f3f5f8; } td.text, th.text { text-align: left; }
td.neg { color: #a40000; }
pre { background: #f6f8fa; border: 1px solid #dde; padding: .7rem; overflow-x: auto; font-size: 13px; }
code { font-size: 13px; } .muted { color: #5a6370; } .hash { font-family: ui-monospace, monospace; font-size: 12px; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; }
a { color: #0b4ea2; }
form { margin: .8rem 0 1.2rem; } label { display: block; font-weight: 600; margin: .5rem 0 .2rem; }
input { font: 13px ui-monospace, monospace; padding: .3rem; border: 1px solid #5a6370; width: 100%; max-width: 48rem; }
input[type=number] { max-width: 10rem; }
button { margin-top: .5rem; font: inherit; padding: .3rem .8rem; }
.result { font-weight: 600; } .ok { color: #0f5c1c; } .bad { color: #a40000; }
svg { max-width: 100%; height: auto; }
"""


class PageCheckpoint(NamedTuple):
    tree_size: int
    note: str
    signed_at: dt.datetime


class PageEntry(NamedTuple):
    index: int
    type: str
    occurred_at: dt.datetime
    leaf_hash: bytes


class CityName(NamedTuple):
    name: str
    currency: str


class PageCheckpointRow(NamedTuple):
    seq: int
    tree_size: int
    root: bytes
    signed_at: dt.datetime
    cosignatures: int


class PageData(NamedTuple):
    reports: list[CityReport]
    reports_truncated: bool
    journal_size: int
    checkpoint: PageCheckpoint | None
    entries: list[PageEntry]
    verifier_key: str
    base_url: str           # the ledger's public URL, for the commands shown
    checkpoints: Sequence[PageCheckpointRow] = ()   # the most recent first
    names: Mapping[str, CityName] | None = None     # of the cities in `reports` that have one


class CityPageData(NamedTuple):
    city: str
    name: CityName | None
    reports: list[CityReport]
    reports_truncated: bool
    entries: list[PageEntry]         # the city's most recent entries in the window, the most recent first
    chart: list[chart.Point]         # oldest first; empty when the window holds no entry of the city
    window_start: int                # the window: entries window_start .. journal_size - 1
    journal_size: int
    signed_size: int                 # the latest checkpoint's tree size (0 before the first)
    base_url: str


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def money(fen: int, currency: str = "CNY") -> str:
    """An amount in minor units as the major unit: fen as yuan, ¥12,345.67 (another currency: 12,345.67 USD)."""
    sign = "−" if fen < 0 else ""
    major, minor = divmod(abs(fen), 100)
    return f"{sign}¥{major:,}.{minor:02d}" if currency == "CNY" else f"{sign}{major:,}.{minor:02d} {currency}"


def _amount_cell(column: str, amount: int, currency: str = "CNY") -> str:
    cls = ' class="neg"' if amount < 0 else ""
    return f'<td{cls} data-column="{_e(column)}" data-fen="{amount}">{_e(money(amount, currency))}</td>'


def _city_label(city: str, name: CityName | None) -> str:
    if name is None or name.name == city:
        return _e(city)
    return f'{_e(name.name)} <span class="muted">({_e(city)})</span>'


def _report_table(reports: Sequence[CityReport], names: Mapping[str, CityName], caption: str,
                  with_city: bool) -> str:
    head = "".join(f'<th scope="col">{_e(c)}</th>' for c in REPORT_COLUMNS)
    rows = []
    for r in reports:
        name = names.get(r.city)
        cells = "".join(_amount_cell(c, getattr(r, c), name.currency if name else "CNY") for c in REPORT_COLUMNS)
        city = (f'<th scope="row" class="text"><a href="/cities/{_e(r.city)}">{_city_label(r.city, name)}</a></th>'
                if with_city else "")
        rows.append(f'<tr data-city="{_e(r.city)}" data-year="{r.year}" data-program="{_e(r.program)}">'
                    f'{city}<td class="text">{r.year}</td><td class="text">{_e(r.program)}</td>{cells}</tr>')
    city_head = '<th scope="col" class="text">city</th>' if with_city else ""
    return (f'<table id="reports"><caption>{_e(caption)}</caption><thead><tr>{city_head}'
            f'<th scope="col" class="text">year</th><th scope="col" class="text">program</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _reports(data: PageData) -> str:
    if not data.reports:
        return '<p class="muted">The ledger has no budget yet.</p>'
    more = ('<p class="muted">Only the first rows are shown; the report API has every one.</p>'
            if data.reports_truncated else "")
    return _report_table(data.reports, data.names or {}, "Every budget: per city, year and program, in yuan "
                         "(each city's name links to its page)", with_city=True) + more


def _checkpoint(data: PageData) -> str:
    c = data.checkpoint
    if c is None:
        return '<p class="muted">No checkpoint has been signed yet: the journal is empty.</p>'
    behind = data.journal_size - c.tree_size
    status = (f"{behind:,} newer entries are waiting for the next checkpoint (one is signed every second while "
              f"entries arrive)." if behind > 0 else "It covers every entry in the journal.")
    return (f'<p>Tree size <strong id="checkpoint-size">{c.tree_size:,}</strong>, signed at '
            f'<time datetime="{_e(c.signed_at.isoformat())}">{_e(c.signed_at.isoformat())}</time>. {_e(status)} '
            f'The same text is at <a href="/v1/checkpoint"><code>/v1/checkpoint</code></a>.</p>'
            f'<pre id="checkpoint">{_e(c.note)}</pre>')


def _history(data: PageData) -> str:
    if not data.checkpoints:
        return '<p class="muted">No checkpoint yet.</p>'
    rows = "".join(
        f'<tr data-tree-size="{c.tree_size}"><td>{c.seq:,}</td><td>{c.tree_size:,}</td>'
        f'<td class="text hash">{_e(c.root.hex())}</td>'
        f'<td class="text"><time datetime="{_e(c.signed_at.isoformat())}">{_e(c.signed_at.isoformat())}</time></td>'
        f'<td>{c.cosignatures:,}</td></tr>' for c in data.checkpoints)
    return ('<p>Each checkpoint signs the root of the tree over the first <em>tree size</em> entries; each extends '
            'the one before it (<code>cvl audit verify</code> checks the consistency proofs between them). '
            'Cosignatures are those of the witnesses that checked it.</p>'
            f'<table id="checkpoints"><caption>The {len(data.checkpoints)} most recent checkpoints, newest first'
            '</caption><thead><tr><th scope="col">seq</th><th scope="col">tree size</th>'
            '<th scope="col" class="text">root hash (SHA-256, hex)</th><th scope="col" class="text">signed at</th>'
            f'<th scope="col">cosignatures</th></tr></thead><tbody>{rows}</tbody></table>'
            '<p class="muted">Every checkpoint: <code>GET /v1/checkpoints</code> (auditor token).</p>')


def _browser_check(data: PageData) -> str:
    """The forms static/audit.js drives; hidden until it runs, so a page without script shows none of them."""
    signed = data.checkpoint.tree_size if data.checkpoint else 0
    index = f' value="{signed - 1}" max="{signed - 1}"' if signed else ""
    return f"""
<p id="check-needs-script">These two checks run in your browser, with its own SHA-256 and Ed25519 (WebCrypto), and
need JavaScript; everything else on this page does not, and <code>cvl audit verify</code> checks the whole log.</p>
<form id="check-signature" hidden>
<label for="pinned-key">The log's verifier key, as you obtained it independently of this page</label>
<input id="pinned-key" name="key" type="text" autocomplete="off" spellcheck="false" required
 aria-describedby="pinned-key-help">
<p id="pinned-key-help" class="muted">Format <code>name+hexkeyid+base64(0x01 ‖ public key)</code>. Kept in this
browser (local storage) once it verifies, so you pin it once.</p>
<button type="submit">Check the latest checkpoint's signature</button>
<p id="signature-result" class="result" role="status" aria-live="polite"></p>
</form>
<form id="check-inclusion" hidden>
<label for="entry-index">Entry index</label>
<input id="entry-index" name="index" type="number" min="0"{index} required>
<label for="auditor-token">Auditor token (the leaf and its proof need one)</label>
<input id="auditor-token" name="token" type="password" autocomplete="off" required
 aria-describedby="auditor-token-help">
<p id="auditor-token-help" class="muted">Sent only to this ledger, with the two requests of this check
(<code>/v1/entries</code> and <code>/v1/proofs/inclusion</code>); never stored.</p>
<button type="submit">Check the entry's inclusion proof</button>
<p id="inclusion-result" class="result" role="status" aria-live="polite"></p>
</form>
"""


def _verify(data: PageData) -> str:
    url = _e(data.base_url)
    key = _e(data.verifier_key)
    return f"""
<p>The log's Ed25519 verifier key (C2SP signed-note format), also at <a href="/v1/log/key"><code>/v1/log/key</code></a>.
Keep a copy obtained independently of this page and compare: a checkpoint proves something only under a key you
trust.</p>
<pre id="verifier-key">{key}</pre>
<p>With an auditor token (<code>cvl token issue --role auditor</code>, from the ledger's operator), check the whole log
online — every leaf against its postings, every checkpoint's root and signature, consistency between checkpoints,
and every balance:</p>
<pre>cvl audit verify --url {url}</pre>
<p>or export it and verify the export offline, on a machine of your own:</p>
<pre>cvl audit export --url {url} --out ledger-export
cvl audit verify --file ledger-export --key '{key}'</pre>
<p>Any RFC 9162 implementation can check the proofs too: <code>GET /v1/proofs/inclusion?index=I&amp;tree_size=N</code>
and <code>GET /v1/proofs/consistency?first=M&amp;second=N</code>, with
<code>Authorization: Bearer &lt;token&gt;</code>.</p>
"""


def _entries(data: PageData) -> str:
    if not data.entries:
        return '<p class="muted">No entries yet.</p>'
    signed = data.checkpoint.tree_size if data.checkpoint else 0
    return ('<p>Entries are leaves of the Merkle tree in index order. The leaf hash is SHA-256(0x00 ‖ leaf); '
            'the proofs need an auditor token.</p>'
            + _entry_table(data.entries, signed, "The most recent entries, newest first"))


def _entry_table(entries: Sequence[PageEntry], signed: int, caption: str) -> str:
    rows = []
    for e in entries:
        if e.index < signed:
            href = f"/v1/proofs/inclusion?index={e.index}&tree_size={signed}"
            proof = f'<a href="{_e(href)}">inclusion proof in tree {signed:,}</a>'
        else:
            proof = '<span class="muted">in the next checkpoint</span>'
        rows.append(f'<tr data-index="{e.index}"><td>{e.index:,}</td><td class="text">{_e(e.type)}</td>'
                    f'<td class="text">{_e(e.occurred_at.isoformat())}</td>'
                    f'<td class="text hash">{_e(e.leaf_hash.hex())}</td><td class="text">{proof}</td></tr>')
    return (f'<table id="entries"><caption>{_e(caption)}</caption><thead><tr><th scope="col">index</th>'
            '<th scope="col" class="text">type</th><th scope="col" class="text">occurred at</th>'
            '<th scope="col" class="text">leaf hash</th><th scope="col" class="text">proof</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


SCRIPT_PATH: Final = "/static/audit.js"
_LEGEND: Final = """A city may run several programs (voucher schemes), each with
its own budget; <code>default</code> is the city's first. budget includes carried_in (unspent value of the previous
year's expired vouchers, carried into this year); expired includes carried_out (carried on to the next year).
available + lapsed + carried_out = budget − issued + revoked + expired;
outstanding = issued − redeemed + refunded − revoked − expired."""


def _head(title: str, script: bool) -> str:
    tag = f'\n<script src="{SCRIPT_PATH}" defer></script>' if script else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_STYLE}</style>{tag}
</head>"""


def render(data: PageData) -> str:
    return f"""{_head("Compute voucher ledger: auditor's page", script=True)}
<body>
<main>
<h1>Compute voucher ledger</h1>
<p class="lead">For auditors: budgets and what became of them, and how to check this ledger without trusting its
operator. The journal has <strong id="journal-size">{data.journal_size:,}</strong> entries.</p>

<h2>Budgets by city, year and program</h2>
<p class="muted">Amounts in yuan (¥, from the ledger's fen; the exact fen are in each cell's data). {_LEGEND}</p>
{_reports(data)}

<h2>Latest signed checkpoint</h2>
{_checkpoint(data)}

<h2>Check it in your browser</h2>
{_browser_check(data)}

<h2>Checkpoint history</h2>
{_history(data)}

<h2>Verify it yourself</h2>
{_verify(data)}

<h2>Most recent entries</h2>
{_entries(data)}
</main>
</body>
</html>
"""


def _city_chart(data: CityPageData, label: str, currency: str) -> str:
    window = (f"the journal's latest {data.journal_size - data.window_start:,} entries (indexes "
              f"{data.window_start:,}–{max(data.window_start, data.journal_size - 1):,})")
    if not data.chart:
        return f'<p class="muted">No entry of {_e(label)} among {_e(window)}.</p>'

    def fmt(fen: int) -> str:
        return money(fen, currency)
    rows = "".join(
        f'<tr data-at="{_e(p.at.isoformat())}"><td class="text"><time datetime="{_e(p.at.isoformat())}">'
        f'{_e(p.at.isoformat(timespec="seconds"))}</time></td>'
        + "".join(_amount_cell(c, getattr(p, c), currency) for c in chart.SERIES) + "</tr>"
        for p in data.chart)
    return (f'<p>Bucketed from {_e(window)}: the last point is the reports now, each earlier point is what they '
            'said before the entries after it (exact figures, not samples); available is the balance of the '
            'city\'s budget accounts.</p>'
            + chart.svg(data.chart, fmt, f"Issued, redeemed and available over time: {label}")
            + '<details><summary>The chart\'s points as a table</summary>'
              '<table id="chart-points"><caption>The chart\'s points, oldest first</caption><thead><tr>'
              '<th scope="col" class="text">up to</th>'
            + "".join(f'<th scope="col">{c}</th>' for c in chart.SERIES)
            + f'</tr></thead><tbody>{rows}</tbody></table></details>')


def render_city(data: CityPageData) -> str:
    label = data.name.name if data.name else data.city
    currency = data.name.currency if data.name else "CNY"
    names = {data.city: data.name} if data.name else {}
    reports = (_report_table(data.reports, names, f"{label}: every budget by year and program, in yuan",
                             with_city=False) if data.reports
               else '<p class="muted">No budget of this city is journaled yet.</p>')
    if data.reports_truncated:
        reports += '<p class="muted">Only the first rows are shown; the report API has every one.</p>'
    entries = (_entry_table(data.entries, data.signed_size, f"{label}: its most recent entries, newest first")
               if data.entries else '<p class="muted">No entry of this city among the journal\'s latest entries.</p>')
    url = _e(data.base_url)
    year = data.reports[-1].year if data.reports else 2026
    return f"""{_head(f"{label}: compute voucher ledger", script=False)}
<body>
<main>
<p><a href="/">← All cities and the audit log</a></p>
<h1>{_city_label(data.city, data.name)}</h1>
<p class="lead">City id <code id="city-id">{_e(data.city)}</code>{", currency " + _e(currency) if data.name else ""}.
The journal has <strong id="journal-size">{data.journal_size:,}</strong> entries.</p>

<h2>Budgets by program and year</h2>
<p class="muted">Amounts in yuan (¥). {_LEGEND}</p>
{reports}

<h2>Issued, redeemed and available over time</h2>
{_city_chart(data, label, currency)}

<h2>Recent entries</h2>
<p>Entries that post to this city's budget accounts or to its vouchers, among the journal's latest
{data.journal_size - data.window_start:,}. The proofs need an auditor token.</p>
{entries}

<h2>Verify it yourself</h2>
<p>A report as JSON, with an auditor token (a token scoped to this city will do):</p>
<pre>curl -H "Authorization: Bearer $CVL_TOKEN" {url}/v1/reports/cities/{_e(data.city)}/{year}</pre>
<p>and the whole log, every report included:</p>
<pre>cvl audit verify --url {url}</pre>
</main>
</body>
</html>
"""


def render_missing_city(city: str) -> str:
    return f"""{_head("No such city: compute voucher ledger", script=False)}
<body>
<main>
<p><a href="/">← All cities and the audit log</a></p>
<h1>No city {_e(city)}</h1>
<p>The ledger has journaled nothing of a city with this id.</p>
</main>
</body>
</html>
"""
