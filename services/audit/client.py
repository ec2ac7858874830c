"""Reading the ledger's public API for an audit: the entries in order, the checkpoints, the key and the totals.

Only the standard library's http.client (keep-alive, one connection per thread) and msgspec: the auditor's tool
must be easy to read and to run anywhere, and shares no code with the ledger service.

`stream_ledger` is the one way both `cvl audit export` and `cvl audit verify --url` read a live ledger:

1. entries are read from 0 up to the trial balance's `entries`, then the totals (trial balance, each city-year
   report, the balances of every city-year and provider account seen) are read; the reports are those of every (city,
   year, program) named by a city-year account seen (`appropriation|budget|lapsed:{city}:{year}[:{program}]`, program
   `default` when not spelled out), read with GET /v1/reports/cities/{city}/{year}?program=, bracketed by two trial
   balances. When both name the same size, nothing was appended in between, so the totals describe exactly the entries
   read so far. Otherwise the new entries are read and the totals taken again (at most TOTALS_ATTEMPTS_MAX times; a
   ledger that never pauses gets the trial balance alone, which is one consistent statement on the server);
2. then the entries up to the newest signed checkpoint are read too (waiting up to CHECKPOINT_WAIT_S for one that
   covers the totals), so that every entry read is under a signature.
"""
from __future__ import annotations

import http.client
import re
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final

import msgspec

ENTRIES_PAGE_MAX: Final = 1000        # the ledger's limit for GET /v1/entries
CHECKPOINTS_PAGE_MAX: Final = 1000    # the ledger's limit for GET /v1/checkpoints
PAGES_IN_FLIGHT_MAX: Final = 4        # entry pages requested ahead of the one being processed (bounded memory)
HTTP_TIMEOUT_S: Final = 60.0
HTTP_ATTEMPTS_MAX: Final = 4          # a request is retried after a connection error or a 5xx, with backoff
HTTP_BACKOFF_S: Final = 0.5
TOTALS_ATTEMPTS_MAX: Final = 5
TOTALS_ACCOUNTS_MAX: Final = 10_000   # city-year and provider accounts whose balances the totals carry
CHECKPOINT_WAIT_S: Final = 10.0       # the ledger signs at least once a second while entries arrive
CHECKPOINT_POLL_S: Final = 0.25

# Accounts other than voucher:/hold: ones, found in a page of entries without decoding it.
_TOTALS_ACCOUNT_RE: Final = re.compile(rb'"account":"((?:appropriation|budget|lapsed|provider):[a-z0-9:-]{1,160})"')
DEFAULT_PROGRAM: Final = "default"


class ApiError(RuntimeError):
    """The ledger API answered something other than what the audit needs."""


# --- what the API serves (only the fields the audit reads; new fields are ignored) ----------------------------------

class TrialBalance(msgspec.Struct):
    debits: int
    credits: int
    entries: int


class CityReport(msgspec.Struct, kw_only=True):
    city: str
    year: int
    budget: int
    issued: int
    redeemed: int
    refunded: int
    revoked: int
    expired: int
    outstanding: int
    available: int
    # Since programs (absent from a ledger, or an export, of before: the city's only budget, nothing carried).
    program: str = DEFAULT_PROGRAM
    carried_in: int = 0
    carried_out: int = 0


class AccountView(msgspec.Struct):
    account: str
    debits: int
    credits: int
    balance: int


class CheckpointView(msgspec.Struct):
    tree_size: int
    note: str
    signed_at: str | None = None


class Checkpoints(msgspec.Struct):
    checkpoints: list[CheckpointView]


class RawEntries(msgspec.Struct):
    entries: list[msgspec.Raw]


class Totals(msgspec.Struct, kw_only=True):
    """What the ledger API reported when the log had `tree_size` entries."""

    tree_size: int
    trial_balance: TrialBalance
    reports: list[CityReport] = []
    accounts: list[AccountView] = []
    complete: bool = True   # False: the ledger never paused, only the trial balance was taken
    note: str | None = None


_decode_trial_balance: Final = msgspec.json.Decoder(TrialBalance).decode
_decode_report: Final = msgspec.json.Decoder(CityReport).decode
_decode_account: Final = msgspec.json.Decoder(AccountView).decode
_decode_checkpoints: Final = msgspec.json.Decoder(Checkpoints).decode


# --- the HTTP client --------------------------------------------------------------------------------------------------

class LedgerClient:
    def __init__(self, base_url: str, token: str | None, *, timeout_s: float = HTTP_TIMEOUT_S):
        parts = urllib.parse.urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r} is not an http(s) URL")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path
        self._headers = {"Accept": "application/json, text/plain"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._timeout_s = timeout_s
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self._timeout_s)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def get(self, path: str, **query: Any) -> tuple[int, bytes]:
        target = self._prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")
        for attempt in range(1, HTTP_ATTEMPTS_MAX + 1):
            try:
                conn = self._connection()
                conn.request("GET", target, headers=self._headers)
                response = conn.getresponse()
                body = response.read()
                if response.status < 500 or attempt == HTTP_ATTEMPTS_MAX:
                    return response.status, body
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if attempt == HTTP_ATTEMPTS_MAX:
                    raise ApiError(f"GET {self.base_url}{path}: {exc}") from exc
            time.sleep(HTTP_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    def get_ok(self, path: str, **query: Any) -> bytes:
        status, body = self.get(path, **query)
        if status != 200:
            detail = body[:500].decode(errors="replace")
            hint = " (is the token an unscoped auditor's? see --token)" if status in (401, 403) else ""
            raise ApiError(f"GET {self.base_url}{path} answered {status}: {detail}{hint}")
        return body

    def get_text(self, path: str, **query: Any) -> str:
        return self.get_ok(path, **query).decode()

    # --- the calls an audit makes ---

    def trial_balance(self) -> TrialBalance:
        return _decode_trial_balance(self.get_ok("/v1/trial-balance"))

    def report(self, city: str, year: int, program: str = DEFAULT_PROGRAM) -> CityReport | None:
        query = {} if program == DEFAULT_PROGRAM else {"program": program}
        status, body = self.get(f"/v1/reports/cities/{city}/{year}", **query)
        if status == 404:
            return None
        if status != 200:
            raise ApiError(f"GET /v1/reports/cities/{city}/{year} (program {program}) answered {status}: "
                           f"{body[:300]!r}")
        report = _decode_report(body)
        if (report.city, report.year, report.program) != (city, year, program):
            raise ApiError(f"GET /v1/reports/cities/{city}/{year} (program {program}) answered the report of "
                           f"{report.city} {report.year} program {report.program}")
        return report

    def account(self, name: str) -> AccountView | None:
        status, body = self.get(f"/v1/accounts/{urllib.parse.quote(name, safe=':')}")
        if status == 404:
            return None
        if status != 200:
            raise ApiError(f"GET /v1/accounts/{name} answered {status}: {body[:300]!r}")
        return _decode_account(body)

    def latest_checkpoint(self) -> str:
        return self.get_text("/v1/checkpoint")

    def verifier_key(self) -> str:
        return self.get_text("/v1/log/key").strip()

    def checkpoints(self) -> Iterator[CheckpointView]:
        """Every checkpoint the ledger keeps, in size order, a page at a time."""
        start = 0
        while True:
            page = _decode_checkpoints(self.get_ok("/v1/checkpoints", start=start, limit=CHECKPOINTS_PAGE_MAX))
            yield from page.checkpoints
            if len(page.checkpoints) < CHECKPOINTS_PAGE_MAX:
                return
            start += len(page.checkpoints)

    def entry_pages(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        """(first index, raw JSON page) for entries [start, stop), in order; up to PAGES_IN_FLIGHT_MAX requests run
        ahead of the caller, so the network and the server overlap with the caller's work, in bounded memory."""
        def fetch(first: int) -> tuple[int, bytes]:
            return first, self.get_ok("/v1/entries", start=first, limit=min(ENTRIES_PAGE_MAX, stop - first))
        firsts = iter(range(start, stop, ENTRIES_PAGE_MAX))
        with ThreadPoolExecutor(PAGES_IN_FLIGHT_MAX, thread_name_prefix="cvl-audit-page") as pool:
            pending: deque[Future[tuple[int, bytes]]] = deque()
            try:
                for first in firsts:
                    pending.append(pool.submit(fetch, first))
                    if len(pending) >= PAGES_IN_FLIGHT_MAX:
                        break
                while pending:
                    page = pending.popleft().result()
                    if (first := next(firsts, None)) is not None:
                        pending.append(pool.submit(fetch, first))
                    yield page
            finally:
                for f in pending:
                    f.cancel()


# --- a consistent read of a live ledger -------------------------------------------------------------------------------

class Progress:
    """`export [#####...] 41,000/100,000  41% 52,310/s ETA 1s` on stderr: redrawn in place on a terminal, a line
    every LINE_S otherwise (logs). The standard library suffices; no progress-bar dependency."""

    REDRAW_S: Final = 0.2
    LINE_S: Final = 5.0

    def __init__(self, label: str, *, enabled: bool = True, stream=None):
        self.label, self.enabled = label, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self.shown = time.monotonic()
        self.done = self.total = 0

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = max(total, done)
        now = time.monotonic()
        if self.enabled and now - self.shown >= (self.REDRAW_S if self.tty else self.LINE_S):
            self.shown = now
            self._show(now)

    def _show(self, now: float, end: str | None = None) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        total = max(self.total, self.done)
        pct = f"{100 * self.done / total:3.0f}%" if total else "   "
        eta = f"ETA {max(total - self.done, 0) / rate:.0f}s" if rate and total else ""
        width = 24
        filled = int(width * self.done / total) if total else 0
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.label} [{bar}] {self.done:,}/{total:,} {pct} {rate:,.0f}/s {eta}"
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + (end or ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._show(time.monotonic(), end="\n")


def read_totals(client: LedgerClient, size: int, accounts: set[bytes]) -> Totals | None:
    """The totals for a log of `size` entries, or None when the log grew while they were read."""
    before = client.trial_balance()
    if before.entries != size:
        return None
    names = sorted(a.decode() for a in accounts)
    city_years = sorted({report_key(n) for n in names if n.startswith(("appropriation:", "budget:", "lapsed:"))})
    reports = [r for cy in city_years if (r := client.report(*cy)) is not None]
    views = [a for n in names[:TOTALS_ACCOUNTS_MAX] if (a := client.account(n)) is not None]
    after = client.trial_balance()
    if after.entries != size:
        return None
    note = None if len(names) <= TOTALS_ACCOUNTS_MAX else f"balances of the first {TOTALS_ACCOUNTS_MAX} accounts only"
    return Totals(tree_size=size, trial_balance=after, reports=reports, accounts=views, note=note)


def report_key(account: str) -> tuple[str, int, str]:
    """(city, year, program) of a city-year account: `{kind}:{city}:{year}`, or `...:{program}` for a program other
    than default."""
    _, city, year, *program = account.split(":")
    return city, int(year), program[0] if program else DEFAULT_PROGRAM


def checkpoint_size(note: str) -> int:
    """The size a checkpoint note claims (unverified: only to decide how far to read; the verifier checks it)."""
    try:
        return int(note.split("\n", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ApiError(f"GET /v1/checkpoint did not serve a checkpoint: {note[:200]!r}") from exc


def stream_ledger(client: LedgerClient, on_page: Callable[[int, int, bytes], None],
                  on_totals: Callable[[Totals], None], progress: Progress | None = None) -> int:
    """Read the log from entry 0 as described in the module docstring; returns how many entries were read.

    `on_page(first_index, count, raw_page)` gets every page in order, and must check the page holds the `count`
    entries asked for; `on_totals` is called once, when exactly `totals.tree_size` entries have been passed on.
    """
    size = 0
    accounts: set[bytes] = set()

    def read_to(stop: int) -> None:
        nonlocal size
        for first, page in client.entry_pages(size, stop):
            assert first == size
            count = min(ENTRIES_PAGE_MAX, stop - first)
            accounts.update(_TOTALS_ACCOUNT_RE.findall(page))
            on_page(first, count, page)
            size = first + count
            if progress:
                progress.update(size)

    totals = None
    head = client.trial_balance()
    for _ in range(TOTALS_ATTEMPTS_MAX):
        if progress:
            progress.update(size, head.entries)
        read_to(head.entries)
        totals = read_totals(client, size, accounts)
        if totals is not None:
            break
        head = client.trial_balance()
    if totals is None:
        # The ledger never paused: the totals are the trial balance alone, at the size it names.
        head = client.trial_balance()
        if progress:
            progress.update(size, head.entries)
        read_to(head.entries)
        totals = Totals(tree_size=size, trial_balance=head, complete=False,
                        note=f"the ledger kept growing over {TOTALS_ATTEMPTS_MAX} attempts: trial balance only")
    on_totals(totals)

    deadline = time.monotonic() + CHECKPOINT_WAIT_S
    while True:
        signed = checkpoint_size(client.latest_checkpoint())
        if signed >= size or time.monotonic() > deadline:
            break
        time.sleep(CHECKPOINT_POLL_S)
    if signed > size:
        if progress:
            progress.update(size, signed)
        read_to(signed)
    return size
