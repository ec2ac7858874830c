"""The auditor's web page (GET /): plain server-rendered HTML and CSS, no script, every value escaped.

The page is public: it shows what is public-money information anyway — per city, year and program (voucher scheme), the
budget and what became of it — plus the latest signed checkpoint, the verifier key, and the most recent entries by
index, type, time and leaf hash only (no accounts, vouchers, providers or amounts of single entries). Everything finer
stays behind the authenticated JSON API, including the inclusion proofs the entries link to (they need an auditor's
bearer token).
"""
from __future__ import annotations

import datetime as dt
import html
from typing import Final, NamedTuple

from schemas.ledger import CityReport

REPORT_COLUMNS: Final = ("budget", "issued", "redeemed", "refunded", "revoked", "expired", "outstanding",
                         "available", "carried_in", "carried_out")

_STYLE: Final = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 76rem; padding: 0 1rem; color: #1b1f24; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccd; }
p.lead { color: #555; margin-top: 0; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .5rem; border-bottom: 1px solid #e3e6ea; text-align: right; white-space: nowrap; }
th { background: #f3f5f8; } td.text, th.text { text-align: left; }
td.neg { color: #a40000; }
pre { background: #f6f8fa; border: 1px solid #dde; padding: .7rem; overflow-x: auto; font-size: 13px; }
code { font-size: 13px; } .muted { color: #667; } .hash { font-family: ui-monospace, monospace; font-size: 12px; }
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


class PageData(NamedTuple):
    reports: list[CityReport]
    reports_truncated: bool
    journal_size: int
    checkpoint: PageCheckpoint | None
    entries: list[PageEntry]
    verifier_key: str
    base_url: str           # where the service is reached, for the commands shown


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _amount_cell(column: str, amount: int) -> str:
    cls = ' class="neg"' if amount < 0 else ""
    return f'<td{cls} data-column="{_e(column)}" data-fen="{amount}">{amount:,}</td>'


def _reports(data: PageData) -> str:
    if not data.reports:
        return '<p class="muted">The ledger has no budget yet.</p>'
    head = "".join(f"<th>{_e(c)}</th>" for c in REPORT_COLUMNS)
    rows = []
    for r in data.reports:
        cells = "".join(_amount_cell(c, getattr(r, c)) for c in REPORT_COLUMNS)
        rows.append(f'<tr data-city="{_e(r.city)}" data-year="{r.year}" data-program="{_e(r.program)}">'
                    f'<td class="text">{_e(r.city)}</td><td class="text">{r.year}</td>'
                    f'<td class="text">{_e(r.program)}</td>{cells}</tr>')
    more = ('<p class="muted">Only the first rows are shown; the report API has every one.</p>'
            if data.reports_truncated else "")
    return (f'<table id="reports"><thead><tr><th class="text">city</th><th class="text">year</th>'
            f'<th class="text">program</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>{more}')


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
    rows = []
    for e in data.entries:
        if e.index < signed:
            href = f"/v1/proofs/inclusion?index={e.index}&tree_size={signed}"
            proof = f'<a href="{_e(href)}">inclusion proof in tree {signed:,}</a>'
        else:
            proof = '<span class="muted">in the next checkpoint</span>'
        rows.append(f'<tr data-index="{e.index}"><td>{e.index:,}</td><td class="text">{_e(e.type)}</td>'
                    f'<td class="text">{_e(e.occurred_at.isoformat())}</td>'
                    f'<td class="text hash">{_e(e.leaf_hash.hex())}</td><td class="text">{proof}</td></tr>')
    return ('<p>Entries are leaves of the Merkle tree in index order. The leaf hash is SHA-256(0x00 ‖ leaf); '
            'the proofs need an auditor token.</p>'
            '<table id="entries"><thead><tr><th>index</th><th class="text">type</th><th class="text">occurred at</th>'
            '<th class="text">leaf hash</th><th class="text">proof</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def render(data: PageData) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Compute voucher ledger: auditor's page</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>Compute voucher ledger</h1>
<p class="lead">For auditors: budgets and what became of them, and how to check this ledger without trusting its
operator. The journal has <strong id="journal-size">{data.journal_size:,}</strong> entries.</p>

<h2>Budgets by city, year and program</h2>
<p class="muted">Amounts in minor units (fen for CNY). A city may run several programs (voucher schemes), each with
its own budget; <code>default</code> is the city's first. budget includes carried_in (unspent value of the previous
year's expired vouchers, carried into this year); expired includes carried_out (carried on to the next year).
available + lapsed + carried_out = budget − issued + revoked + expired;
outstanding = issued − redeemed + refunded − revoked − expired.</p>
{_reports(data)}

<h2>Latest signed checkpoint</h2>
{_checkpoint(data)}

<h2>Verify it yourself</h2>
{_verify(data)}

<h2>Most recent entries</h2>
{_entries(data)}
</body>
</html>
"""
