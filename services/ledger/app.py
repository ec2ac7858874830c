"""Ledger service HTTP edge: routes, roles, and the wiring of the pool, the journal's consumer and the checkpoint
signer.

The ledger only reads events and writes its own tables: it produces no events, so it has no outbox relay.
Roles: admin and auditor read the ledger; an auditor scoped to a city sees only that city's accounts and report
(not provider accounts, which span cities, nor the trial balance and entries, which cover every city); the issuer
of a city may also read that city's report. The audit log is global: any auditor, scoped or not, and admin get
checkpoints and proofs. Public, without a token: the auditor's page `GET /` and a page per city `GET /cities/{city}`
(aggregates only, see page.py) with the page's one script `GET /static/audit.js`, the verifier key and the latest
checkpoint (signed public material, shown on that page anyway).

Proof requests: a parameter that is missing, not an integer or out of its range (index >= 0, sizes >= 1), or an
index not below tree_size, or first > second, is 422 `validation_error` naming the parameter; a tree size beyond
the latest signed checkpoint (or any before the first checkpoint) is 404 `not_found`: that tree is not signed yet.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Final, Generic, TypeVar

import aiohttp
import asyncpg
from aiohttp import web
from msgspec import Meta
from prometheus_client import Counter, Gauge

from schemas.common import DEFAULT_PROGRAM, CityId, ProgramId, Year
from schemas.ledger import (
    Account, AccountAt, AccountEntries, Checkpoints, CityReport, ConsistencyProof, Entries, InclusionProof, TrialBalance,
)
from schemas.limits import (
    ACCOUNT_ENTRIES_SCAN_MAX, BIGINT_MAX, BUDGET_GAUGES_MAX, BUDGET_GAUGES_REFRESH_S, CHECKPOINT_INTERVAL_S,
    CHECKPOINTS_LIMIT_DEFAULT, CITY_CHART_BUCKETS, CITY_PAGE_ENTRIES, CITY_PAGE_REPORTS_MAX, CITY_WINDOW_ENTRIES_MAX,
    PAGE_CACHE_PATHS_MAX, PAGE_CHECKPOINTS,
    CHECKPOINTS_LIMIT_MAX, ENTRIES_LIMIT_DEFAULT,
    ENTRIES_LIMIT_MAX, LOG_STATUS_REFRESH_S, PAGE_CACHE_S, PAGE_ENTRIES, PAGE_REPORTS_MAX, SHUTDOWN_TIMEOUT_S,
)

from services.common import db, http, kafka, metrics, paging, tasks
from services.common.auth import Principal, require
from services.common.consumer import Consumer, Delivered
from services.common.errors import Forbidden, ValidationFailed
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings

from . import cities, commands, domain, notes, page, queries, witnesses

log = logging.getLogger("cvl.ledger")

SERVICE: Final = "ledger"
SCHEMA: Final = "ledger"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "ledger"
TEXT_PLAIN: Final = "text/plain"
# No remote resources and no inline script: the pages' only style is inline, their only script is our static file
# (GET /static/audit.js), which may fetch from this origin only.
PAGE_HEADERS: Final = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                                  "script-src 'self'; connect-src 'self'",
                       "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
STATIC: Final = Path(__file__).parent / "static"
SCRIPT_HEADERS: Final = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

POOL: Final = web.AppKey("pool", asyncpg.Pool)
LOG_KEY: Final = web.AppKey("log_key", notes.LogKey)
WITNESSES: Final = web.AppKey("witnesses", list)

journal_size = Gauge("cvl_ledger_journal_size_entries", "Entries in the journal (the Merkle tree size)")
checkpoint_size = Gauge("cvl_ledger_checkpoint_tree_size", "Tree size of the latest signed checkpoint")
checkpoint_behind = Gauge("cvl_ledger_checkpoint_behind_entries",
                          "Journal entries not yet covered by a signed checkpoint")
checkpoints_signed = Counter("cvl_ledger_checkpoints_signed_total", "Checkpoints this process signed")
checkpoint_failures = Counter("cvl_ledger_checkpoint_failures_total",
                              "Signing rounds that failed: the tree does not extend the latest checkpoint "
                              "(inconsistent) or the round could not complete (error)", ["reason"])
for _reason in ("inconsistent", "error"):
    checkpoint_failures.labels(_reason)


class _CheckpointAge:
    """Seconds since the latest checkpoint was signed (before the first: since the first entry arrived; 0 while the
    journal is empty), by the database's clock at the last refresh, plus the time since that refresh."""

    def __init__(self) -> None:
        self.age_s: float | None = None
        self.at = time.monotonic()

    def set(self, age_s: float | None) -> None:
        self.age_s, self.at = age_s, time.monotonic()

    def __call__(self) -> float:
        return 0.0 if self.age_s is None else self.age_s + (time.monotonic() - self.at)


checkpoint_age = _CheckpointAge()
Gauge("cvl_ledger_checkpoint_age_seconds", checkpoint_age.__doc__ or "").set_function(checkpoint_age)
page_renders = Counter("cvl_ledger_page_renders_total", "Renders of the auditor's page (at most one per "
                       "PAGE_CACHE_S per process, whatever the traffic)")


T = TypeVar("T")


class PageCache(Generic[T]):
    """The auditor's page, rendered at most once per PAGE_CACHE_S: the rendered bytes are kept with the time their
    render started, and requests while a render runs wait for that one render instead of starting their own. So a
    flood of `GET /` costs the database one page's queries per second per process.

    The render runs in its own task: a waiter that goes away (a client gone, its time limit) does not cancel it for
    the others. A failed render is not kept; every waiter gets its error, and the next request tries again."""

    def __init__(self, render: Callable[[], Awaitable[T]], clock: Callable[[], float] = time.monotonic):
        self._render, self._clock = render, clock
        self._body: T | None = None
        self._at = 0.0
        self._running: asyncio.Task[T] | None = None

    async def get(self) -> T:
        if self._body is not None and self._clock() - self._at < PAGE_CACHE_S:
            return self._body
        if self._running is None:
            self._running = asyncio.create_task(self._run(), name="auditor-page")
            self._running.add_done_callback(_retrieve)
        return await asyncio.shield(self._running)

    async def _run(self) -> T:
        started = self._clock()
        try:
            body = await self._render()
            page_renders.inc()
            self._body, self._at = body, started
            return body
        finally:
            self._running = None


class PageCaches(Generic[T]):
    """A PageCache per path (a city's page each), for at most PAGE_CACHE_PATHS_MAX paths: the least recently asked
    for goes first, so a flood of distinct paths keeps the memory bounded (each path still renders at most once per
    PAGE_CACHE_S while it is kept)."""

    def __init__(self, paths_max: int = PAGE_CACHE_PATHS_MAX):
        self._paths_max = paths_max
        self._caches: collections.OrderedDict[str, PageCache[T]] = collections.OrderedDict()

    async def get(self, path: str, render: Callable[[], Awaitable[T]]) -> T:
        cache = self._caches.get(path)
        if cache is None:
            cache = self._caches[path] = PageCache(render)
            while len(self._caches) > self._paths_max:
                self._caches.popitem(last=False)
        else:
            self._caches.move_to_end(path)
        return await cache.get()


PAGE: Final = web.AppKey("page", PageCache)
CITY_PAGES: Final = web.AppKey("city_pages", PageCaches)
PUBLIC_URL: Final = web.AppKey("public_url", str)
SCRIPT: Final = web.AppKey("script", bytes)


def public_url(settings: Settings, raw: str | None) -> str:
    """`CVL_LEDGER_PUBLIC_URL`: where auditors reach this ledger, for the commands the pages show (behind a proxy or
    a load balancer it is not the bind address); default the bind address. http(s) only, without a trailing slash;
    anything else is refused at start."""
    if not raw:
        return f"http://{settings.host}:{settings.port}"
    url = raw.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url) or url.count("/") > 2:
        raise ValueError(f"CVL_LEDGER_PUBLIC_URL must be an http(s) origin such as https://ledger.example, "
                         f"not {raw!r}")
    return url


def _retrieve(task: asyncio.Task) -> None:
    """A render whose every waiter went away: its error is logged (by the waiters that saw it, if any), not lost."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("rendering the auditor's page failed: %r", exc)

EntryIndex = Annotated[int, Meta(ge=0, le=BIGINT_MAX, description="An entry index (leaf position, from 0)")]
EntriesLimit = Annotated[int, Meta(ge=1, le=ENTRIES_LIMIT_MAX, description="How many entries, at most")]
TreeSize = Annotated[int, Meta(ge=1, le=BIGINT_MAX, description="A tree size (number of leaves)")]
CheckpointStart = Annotated[int, Meta(ge=0, le=BIGINT_MAX,
                                      description="Position of the first checkpoint to return, from 0 (oldest)")]
CheckpointsLimit = Annotated[int, Meta(ge=1, le=CHECKPOINTS_LIMIT_MAX, description="How many checkpoints, at most")]


# --- the journal's consumer -------------------------------------------------------------------------------------------

async def journal(conn: asyncpg.Connection, batch: list[Delivered]) -> None:
    """Consumer handler: fresh events, in delivery order, inside the consumer's transaction (commands.journal)."""
    journaled = await commands.journal(conn, batch)
    await cities.record_names(conn, journaled.entries, batch)
    if batch:  # ack -> ledger: the batch's oldest event, once per batch (cheap at any rate)
        metrics.journal_delay.observe(max(0.0, time.time() - min(d.event.occurred_at for d in batch).timestamp()))
    for d, exc in journaled.rejected:
        metrics.dead_letters.labels(SERVICE, d.topic).inc()
        log.error("event cannot be posted; kept in dead_letters",
                  extra={"event_id": d.event.event_id, "topic": d.topic, "partition": d.partition,
                         "offset": d.offset, "error": str(exc)})
    if journaled.duplicates:
        log.warning("events already journaled were skipped", extra={"count": journaled.duplicates})
    # Counted before the commit: a batch that then fails to commit is counted again when redelivered (rare).
    for type_, count in collections.Counter(e.type for e in journaled.entries).items():
        metrics.journal_entries.labels(type_).inc(count)
    journal_size.set(journaled.size)


async def _refresh_log_status(pool: asyncpg.Pool) -> None:
    """Background task: the tree and checkpoint gauges follow the database (appends and checkpoints of any replica)."""
    while True:
        try:
            status = await queries.log_status(pool)
            journal_size.set(status.size)
            checkpoint_size.set(status.signed_size)
            checkpoint_behind.set(status.size - status.signed_size)
            checkpoint_age.set(status.checkpoint_age_s)
        except Exception:
            log.exception("reading the log's status failed")
        await asyncio.sleep(LOG_STATUS_REFRESH_S)


async def _refresh_budget_gauges(pool: asyncpg.Pool) -> None:
    """Background task: the budget gauges (amount, committed = amount - available) follow the ledger's reports."""
    truncated_logged = False
    while True:
        try:
            reports, truncated = await queries.budget_reports(pool, BUDGET_GAUGES_MAX)
            for r in reports:
                labels = (r.city, r.program, str(r.year))
                metrics.budget_amount.labels(*labels).set(r.budget)
                metrics.budget_committed.labels(*labels).set(r.budget - r.available)
            if truncated and not truncated_logged:
                log.warning("more budgets than BUDGET_GAUGES_MAX: only the first are exported as gauges",
                            extra={"budgets_max": BUDGET_GAUGES_MAX})
            truncated_logged = truncated
        except Exception:
            log.exception("reading the budgets for their gauges failed")
        await asyncio.sleep(BUDGET_GAUGES_REFRESH_S)


async def _sign_checkpoints(pool: asyncpg.Pool, key: notes.LogKey,
                            submitters: list[witnesses.Submitter] | None = None) -> None:
    """Background task: every CHECKPOINT_INTERVAL_S, sign a checkpoint if the journal grew (commands.sign_checkpoint).

    Every replica runs it; the advisory lock lets one sign per round. A refusal (the tree does not extend the latest
    checkpoint) is logged and counted, and retried next round: it persists until an operator looks. A new checkpoint
    wakes this replica's witness submitters, which run in tasks of their own: signing never waits for a witness.
    """
    while True:
        try:
            signed = await commands.sign_checkpoint(pool, key)
            if signed is not None:
                for submitter in submitters or ():
                    submitter.wake.set()
                checkpoints_signed.inc()
                checkpoint_size.set(signed.tree_size)
                checkpoint_age.set(0.0)
                log.debug("checkpoint signed", extra={"tree_size": signed.tree_size, "seq": signed.seq})
        except (commands.InconsistentLog, notes.NoteError, queries.MissingSubtree) as exc:
            checkpoint_failures.labels("inconsistent").inc()
            log.error("refusing to sign a checkpoint: %s", exc)
        except Exception:
            checkpoint_failures.labels("error").inc()
            log.exception("signing a checkpoint failed")
        await asyncio.sleep(CHECKPOINT_INTERVAL_S)


# --- scopes -----------------------------------------------------------------------------------------------------------

def _require_whole_ledger(who: Principal) -> None:
    require(who, "admin", "auditor")
    if who.role == "auditor" and who.city is not None:
        raise Forbidden(f"this auditor token is for city {who.city}; this call covers every city")


async def _require_account_scope(pool: asyncpg.Pool, who: Principal, name: str) -> None:
    """A city-scoped auditor may see its city's (city, year) accounts and its vouchers' accounts only."""
    if who.role != "auditor" or who.city is None:
        return
    ref = domain.parse_account(name)
    if ref.city is not None:
        require(who, "auditor", city=ref.city)
    elif ref.voucher_id is not None:
        require(who, "auditor", city=await queries.voucher_city(pool, name, ref.voucher_id))
    else:
        raise Forbidden(f"this auditor token is for city {who.city}; provider accounts span cities")


# --- handlers ---------------------------------------------------------------------------------------------------------

async def get_account(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin", "auditor")
    name = param(request, "account", domain.AccountName)
    tree_size = param(request, "tree_size", TreeSize, query=True, default=None)
    pool = request.app[POOL]
    await _require_account_scope(pool, who, name)
    if tree_size is not None:
        return await _account_at(pool, name, tree_size)
    return json_response(await queries.account(pool, name))


async def _account_at(pool: asyncpg.Pool, name: str, tree_size: int) -> web.Response:
    """The balance over the first tree_size entries; a size beyond the journal is 422 (it names no tree yet)."""
    totals = await queries.account_at(pool, name, tree_size)
    if totals is None:
        raise ValidationFailed(f"parameter tree_size: {tree_size} is beyond the journal's size", field="tree_size")
    debits, credits = totals
    return json_response(AccountAt(account=name, debits=debits, credits=credits, balance=credits - debits,
                                   tree_size=tree_size))


ACCOUNT_ENTRIES_QUERY: Final = "ledger.account_entries"


async def list_account_entries(request: web.Request) -> web.Response:
    """Entries touching an account, oldest first, in pages (`cursor`), optionally within [from, to) by occurred_at.
    Scopes as GET /v1/accounts/{account}: a city-scoped auditor sees its city's accounts only."""
    who = principal(request)
    require(who, "admin", "auditor")
    name = param(request, "account", domain.AccountName)
    start, end = paging.period(request)
    limit = paging.limit(request)
    pool = request.app[POOL]
    filters = {"account": name, "from": start, "to": end}
    pos = await paging.position(request, pool, ACCOUNT_ENTRIES_QUERY, filters)
    after = paging.check_position(pos, int)[0] if pos is not None else -1
    await _require_account_scope(pool, who, name)
    page_ = await queries.account_entries(pool, name, after, start, end, limit, ACCOUNT_ENTRIES_SCAN_MAX)
    cursor = await paging.next_cursor(pool, ACCOUNT_ENTRIES_QUERY, filters,
                                      None if page_.last is None else [page_.last])
    return json_response(AccountEntries(account=name, entries=page_.entries, next_cursor=cursor))


async def get_city_report(request: web.Request) -> web.Response:
    who = principal(request)
    city = param(request, "city", CityId)
    year = param(request, "year", Year)
    program = param(request, "program", ProgramId, query=True, default=DEFAULT_PROGRAM)
    require(who, "admin", "auditor", "issuer", city=city)
    return json_response(await queries.city_report(request.app[POOL], city, year, program))


async def get_trial_balance(request: web.Request) -> web.Response:
    _require_whole_ledger(principal(request))
    return json_response(await queries.trial_balance(request.app[POOL]))


async def list_entries(request: web.Request) -> web.Response:
    _require_whole_ledger(principal(request))
    start = param(request, "start", EntryIndex, query=True, default=0)
    limit = param(request, "limit", EntriesLimit, query=True, default=ENTRIES_LIMIT_DEFAULT)
    return json_response(await queries.entries(request.app[POOL], start, limit))


# --- the audit log ----------------------------------------------------------------------------------------------------

async def get_inclusion_proof(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    index = param(request, "index", EntryIndex, query=True)
    tree_size = param(request, "tree_size", TreeSize, query=True)
    if index >= tree_size:
        raise ValidationFailed(f"parameter index: {index} is not below tree_size {tree_size}", field="index")
    return json_response(await queries.inclusion_proof(request.app[POOL], index, tree_size))


async def get_consistency_proof(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    first = param(request, "first", TreeSize, query=True)
    second = param(request, "second", TreeSize, query=True)
    if first > second:
        raise ValidationFailed(f"parameter first: {first} is above second ({second})", field="first")
    return json_response(await queries.consistency_proof(request.app[POOL], first, second))


async def get_checkpoint(request: web.Request) -> web.Response:
    return web.Response(text=await queries.latest_note(request.app[POOL]), content_type=TEXT_PLAIN, charset="utf-8")


async def list_checkpoints(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    start = param(request, "start", CheckpointStart, query=True, default=0)
    limit = param(request, "limit", CheckpointsLimit, query=True, default=CHECKPOINTS_LIMIT_DEFAULT)
    return json_response(await queries.checkpoints(request.app[POOL], start, limit))


async def get_log_key(request: web.Request) -> web.Response:
    return web.Response(text=request.app[LOG_KEY].verifier() + "\n", content_type=TEXT_PLAIN, charset="utf-8")


async def get_log_witnesses(request: web.Request) -> web.Response:
    return json_response(witnesses.listing(request.app[WITNESSES]))


def page_renderer(app: web.Application) -> Callable[[], Awaitable[bytes]]:
    async def render() -> bytes:
        data = await queries.page_data(app[POOL], PAGE_REPORTS_MAX, PAGE_ENTRIES,
                                       verifier_key=app[LOG_KEY].verifier(), base_url=app[PUBLIC_URL],
                                       checkpoints_max=PAGE_CHECKPOINTS)
        return page.render(data).encode()
    return render


def city_page_renderer(app: web.Application, city: str) -> Callable[[], Awaitable[tuple[int, bytes]]]:
    """(status, body) of a city's page: 404 with a page of its own for a city the ledger knows nothing of (kept
    like any page, so a flood of unknown ids costs one read per id per second too)."""
    async def render() -> tuple[int, bytes]:
        data = await queries.city_page_data(app[POOL], city, reports_max=CITY_PAGE_REPORTS_MAX,
                                            entries_max=CITY_PAGE_ENTRIES, window_max=CITY_WINDOW_ENTRIES_MAX,
                                            buckets=CITY_CHART_BUCKETS, base_url=app[PUBLIC_URL])
        if data is None:
            return 404, page.render_missing_city(city).encode()
        return 200, page.render_city(data).encode()
    return render


async def auditor_page(request: web.Request) -> web.Response:
    return web.Response(body=await request.app[PAGE].get(), content_type="text/html", charset="utf-8",
                        headers=PAGE_HEADERS)


async def city_page(request: web.Request) -> web.Response:
    city = param(request, "city", CityId)
    status, body = await request.app[CITY_PAGES].get(city, city_page_renderer(request.app, city))
    return web.Response(body=body, status=status, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)


async def audit_script(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SCRIPT], content_type="text/javascript", charset="utf-8",
                        headers=SCRIPT_HEADERS)


ROUTES: Final = [
    Route("GET", "/v1/accounts/{account}", get_account,
          "An account's debits, credits and balance; with `tree_size`, over the first tree_size entries only "
          "(AccountAt)", ("admin", "auditor"), None, Account,
          params={"account": domain.AccountName, "tree_size": TreeSize}),
    Route("GET", "/v1/accounts/{account}/entries", list_account_entries,
          "Entries touching an account, oldest first, optionally with occurred_at in [from, to); pages by cursor",
          ("admin", "auditor"), None, AccountEntries,
          params={"account": domain.AccountName, **paging.PERIOD_PARAMS, **paging.PAGE_PARAMS}),
    Route("GET", "/v1/reports/cities/{city}/{year}", get_city_report,
          "A city's budget of one program (`program`, default `default`) for a year: budget (set and carried in), "
          "issued, redeemed, refunded, revoked, expired (lapsed and carried out), outstanding and available",
          ("admin", "auditor", "issuer"), None, CityReport,
          params={"city": CityId, "year": Year, "program": ProgramId}),
    Route("GET", "/v1/trial-balance", get_trial_balance, "Total debits and credits over all accounts",
          ("admin", "auditor"), None, TrialBalance),
    Route("GET", "/v1/entries", list_entries, "Journal entries from `start`, in index order, with their leaves",
          ("admin", "auditor"), None, Entries, params={"start": EntryIndex, "limit": EntriesLimit}),
    Route("GET", "/v1/proofs/inclusion", get_inclusion_proof,
          "RFC 9162 inclusion proof of entry `index` in the tree of `tree_size` leaves (at most the latest "
          "checkpoint's size)", ("admin", "auditor"), None, InclusionProof,
          params={"index": EntryIndex, "tree_size": TreeSize}, required=("index", "tree_size")),
    Route("GET", "/v1/proofs/consistency", get_consistency_proof,
          "RFC 9162 consistency proof from tree size `first` to `second` (at most the latest checkpoint's size)",
          ("admin", "auditor"), None, ConsistencyProof, params={"first": TreeSize, "second": TreeSize},
          required=("first", "second")),
    Route("GET", "/v1/checkpoints", list_checkpoints,
          "Every signed checkpoint, oldest first, from position `start`", ("admin", "auditor"), None, Checkpoints,
          params={"start": CheckpointStart, "limit": CheckpointsLimit}),
    Route("GET", "/v1/checkpoint", get_checkpoint,
          "text/plain: the latest checkpoint, a C2SP tlog-checkpoint in a signed note (Ed25519), followed by every "
          "witness cosignature collected for it (C2SP tlog-cosignature); public"),
    Route("GET", "/v1/log/key", get_log_key, "text/plain: the log's C2SP verifier key; public"),
    Route("GET", "/v1/log/witnesses", get_log_witnesses,
          "The witnesses this ledger submits its checkpoints to (C2SP tlog-witness): name, verifier key (type 0x04, "
          "cosignature/v1), submission URL; public", (), None, witnesses.WitnessList),
    Route("GET", "/", auditor_page, "text/html: the auditor's page (aggregate figures, checkpoint, how to verify)"),
    Route("GET", "/cities/{city}", city_page,
          "text/html: a city's page (its reports by program and year, recent entries, a chart of issued, redeemed and "
          "available over time); public", params={"city": CityId}),
    Route("GET", page.SCRIPT_PATH, audit_script,
          "text/javascript: the auditor's page's one script (checks a checkpoint's signature and an inclusion proof "
          "in the browser); public"),
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[POOL], probe))
    app[LOG_KEY] = notes.load_log_key(settings.run_dir, notes.origin_from_env())
    app[PUBLIC_URL] = public_url(settings, os.environ.get("CVL_LEDGER_PUBLIC_URL"))
    app[SCRIPT] = (STATIC / "audit.js").read_bytes()
    app[PAGE] = PageCache(page_renderer(app))
    app[CITY_PAGES] = PageCaches()
    app[WITNESSES] = witnesses.witnesses_from_env()
    log.info("checkpoints are signed with the log key", extra={"verifier_key": app[LOG_KEY].verifier()})
    if app[WITNESSES]:
        log.info("checkpoints are submitted to witnesses",
                 extra={"witnesses": [f"{w.verifier}={w.url}" for w in app[WITNESSES]]})

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        consumer = Consumer(settings, pool, topics=[settings.topic_issuing, settings.topic_redemption],
                            group=CONSUMER_GROUP, handler=journal,
                            # The journal's unique event_id is the effect's own key, and `journal` skips ids already
                            # in it under the log_head lock: no processed_events row per event.
                            claim=False)
        app[POOL] = pool
        # One session for every witness (keep-alive connections, as tlog-witness recommends); one task per witness.
        witness_session = aiohttp.ClientSession()
        submitters = [witnesses.Submitter(pool, witness_session, w) for w in app[WITNESSES]]
        consumer_task = asyncio.create_task(consumer.run(), name="ledger-consumer")
        background = [asyncio.create_task(_refresh_log_status(pool), name="log-status"),
                      asyncio.create_task(_refresh_budget_gauges(pool), name="budget-gauges"),
                      asyncio.create_task(_sign_checkpoints(pool, app[LOG_KEY], submitters),
                                          name="checkpoint-signer")]
        background += [asyncio.create_task(s.run(), name=f"witness-{s.name}") for s in submitters]
        if submitters:
            background.append(asyncio.create_task(witnesses.refresh_status(pool, app[WITNESSES]),
                                                  name="witness-status"))
        yield
        # Drain: the consumer finishes (commits) the batch in hand and stops polling; then the pool closes.
        await tasks.stop_within(consumer.stop, consumer_task, SHUTDOWN_TIMEOUT_S,
                                "the consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.cancel_all(background)
        await witness_session.close()
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
