"""Ledger service HTTP edge: routes, roles, and the wiring of the pool, the journal's consumer and the checkpoint
signer.

The ledger only reads events and writes its own tables: it produces no events, so it has no outbox relay.
Roles: admin and auditor read the ledger; an auditor scoped to a city sees only that city's accounts and report
(not provider accounts, which span cities, nor the trial balance and entries, which cover every city); the issuer
of a city may also read that city's report. The audit log is global: any auditor, scoped or not, and admin get
checkpoints and proofs. Public, without a token: the auditor's page `GET /` (aggregates only, see page.py), the
verifier key and the latest checkpoint (signed public material, shown on that page anyway).

Proof requests: a parameter that is missing, not an integer or out of its range (index >= 0, sizes >= 1), or an
index not below tree_size, or first > second, is 422 `validation_error` naming the parameter; a tree size beyond
the latest signed checkpoint (or any before the first checkpoint) is 404 `not_found`: that tree is not signed yet.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import logging
import time
from pathlib import Path
from typing import Annotated, Final

import asyncpg
from aiohttp import web
from msgspec import Meta
from prometheus_client import Counter, Gauge

from schemas.common import CityId, Year
from schemas.ledger import (
    Account, CheckpointView, Checkpoints, CityReport, ConsistencyProof, Entries, InclusionProof, TrialBalance,
)

from services.common import db, http, kafka, metrics, tasks
from services.common.auth import Principal, require
from services.common.consumer import Consumer, Delivered
from services.common.errors import Forbidden, NotFound, ValidationFailed
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings
from schemas.limits import SHUTDOWN_TIMEOUT_S

from . import domain, merkle, notes, page, store

log = logging.getLogger("cvl.ledger")

SERVICE: Final = "ledger"
SCHEMA: Final = "ledger"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "ledger"
ENTRIES_LIMIT_MAX: Final = 1000          # entries one GET /v1/entries returns at most
ENTRIES_LIMIT_DEFAULT: Final = 100
ENTRY_INDEX_MAX: Final = 2**63 - 1       # bigint
LOG_STATUS_REFRESH_S: Final = 1.0        # every replica's gauges follow appends and checkpoints made by the others
CHECKPOINT_INTERVAL_S: Final = 0.5       # a signing round this often: a new checkpoint within a second of growth
CHECKPOINTS_LIMIT_MAX: Final = 1000      # checkpoints one GET /v1/checkpoints returns at most
CHECKPOINTS_LIMIT_DEFAULT: Final = 100
PAGE_ENTRIES: Final = 20                 # the most recent entries on the auditor's page
PAGE_REPORTS_MAX: Final = 1000           # (city, year) rows on the auditor's page
TEXT_PLAIN: Final = "text/plain"

POOL: Final = web.AppKey("pool", asyncpg.Pool)
CONSUMER: Final = web.AppKey("consumer", Consumer)
LOG_KEY: Final = web.AppKey("log_key", notes.LogKey)

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

EntryIndex = Annotated[int, Meta(ge=0, le=ENTRY_INDEX_MAX, description="An entry index (leaf position, from 0)")]
EntriesLimit = Annotated[int, Meta(ge=1, le=ENTRIES_LIMIT_MAX, description="How many entries, at most")]
TreeSize = Annotated[int, Meta(ge=1, le=merkle.TREE_SIZE_MAX, description="A tree size (number of leaves)")]
CheckpointStart = Annotated[int, Meta(ge=0, le=ENTRY_INDEX_MAX,
                                      description="Position of the first checkpoint to return, from 0 (oldest)")]
CheckpointsLimit = Annotated[int, Meta(ge=1, le=CHECKPOINTS_LIMIT_MAX, description="How many checkpoints, at most")]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# --- the journal's consumer -------------------------------------------------------------------------------------------

async def journal(conn: asyncpg.Connection, batch: list[Delivered]) -> None:
    """Consumer handler: fresh events, in delivery order, inside the consumer's transaction."""
    appended = await store.append(conn, batch)
    for d, exc in appended.rejected:
        metrics.dead_letters.labels(SERVICE, d.topic).inc()
        log.error("event cannot be posted; kept in dead_letters",
                  extra={"event_id": d.event.event_id, "topic": d.topic, "partition": d.partition,
                         "offset": d.offset, "error": str(exc)})
    if appended.duplicates:
        log.warning("events already journaled were skipped", extra={"count": appended.duplicates})
    # Counted before the commit: a batch that then fails to commit is counted again when redelivered (rare).
    for type_, count in collections.Counter(e.type for e in appended.entries).items():
        metrics.journal_entries.labels(type_).inc(count)
    journal_size.set(appended.size)


async def _refresh_log_status(pool: asyncpg.Pool) -> None:
    """Background task: the tree and checkpoint gauges follow the database (appends and checkpoints of any replica)."""
    while True:
        try:
            row = await pool.fetchrow(store.LOG_STATUS_SQL)
            signed = row["signed_size"] or 0
            journal_size.set(row["size"])
            checkpoint_size.set(signed)
            checkpoint_behind.set(row["size"] - signed)
            age_s = row["checkpoint_age_s"]
            checkpoint_age.set(None if age_s is None else float(age_s))
        except Exception:
            log.exception("reading the log's status failed")
        await asyncio.sleep(LOG_STATUS_REFRESH_S)


async def _sign_checkpoints(pool: asyncpg.Pool, key: notes.LogKey) -> None:
    """Background task: every CHECKPOINT_INTERVAL_S, sign a checkpoint if the journal grew (store.sign_checkpoint).

    Every replica runs it; the advisory lock lets one sign per round. A refusal (the tree does not extend the latest
    checkpoint) is logged and counted, and retried next round: it persists until an operator looks.
    """
    while True:
        try:
            async with pool.acquire() as conn, conn.transaction():
                signed = await store.sign_checkpoint(conn, key)
            if signed is not None:
                checkpoints_signed.inc()
                checkpoint_size.set(signed.tree_size)
                checkpoint_age.set(0.0)
                log.debug("checkpoint signed", extra={"tree_size": signed.tree_size, "seq": signed.seq})
        except (store.InconsistentLog, notes.NoteError, store.MissingSubtree) as exc:
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
        home = await pool.fetchrow(store.VOUCHER_HOME_SQL, ref.voucher_id)
        if home is None:
            raise NotFound(f"account {name} has never moved")
        require(who, "auditor", city=home["city"])
    else:
        raise Forbidden(f"this auditor token is for city {who.city}; provider accounts span cities")


# --- handlers ---------------------------------------------------------------------------------------------------------

async def get_account(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin", "auditor")
    name = param(request, "account", domain.AccountName)
    pool = request.app[POOL]
    await _require_account_scope(pool, who, name)
    row = await pool.fetchrow(store.GET_ACCOUNT_SQL, name)
    if row is None:
        raise NotFound(f"account {name} has never moved")
    return json_response(store.account_view(row))


async def get_city_report(request: web.Request) -> web.Response:
    who = principal(request)
    city = param(request, "city", CityId)
    year = param(request, "year", Year)
    require(who, "admin", "auditor", "issuer", city=city)
    row = await request.app[POOL].fetchrow(store.GET_REPORT_SQL, city, year, domain.appropriation(city, year),
                                           domain.budget(city, year), domain.lapsed(city, year))
    if row is None:
        raise NotFound(f"the ledger has no event for {city} {year}")
    return json_response(store.report_view(row))


async def get_trial_balance(request: web.Request) -> web.Response:
    _require_whole_ledger(principal(request))
    return json_response(store.trial_balance_view(await request.app[POOL].fetchrow(store.TRIAL_BALANCE_SQL)))


async def list_entries(request: web.Request) -> web.Response:
    _require_whole_ledger(principal(request))
    start = param(request, "start", EntryIndex, query=True, default=0)
    limit = param(request, "limit", EntriesLimit, query=True, default=ENTRIES_LIMIT_DEFAULT)
    pool = request.app[POOL]
    rows = await pool.fetch(store.LIST_JOURNAL_SQL, start, limit)
    # Committed entries never change, so the postings of exactly these entries can be read in a second statement.
    postings = await pool.fetch(store.LIST_POSTINGS_SQL, rows[0]["index"], rows[-1]["index"]) if rows else []
    return json_response(Entries(entries=store.entries_view(rows, postings)))


# --- the audit log ----------------------------------------------------------------------------------------------------

async def _signed_size(pool: asyncpg.Pool, name: str, size: int) -> None:
    """404 unless tree size `size` (parameter `name`) is covered by a signed checkpoint."""
    signed = await pool.fetchval(store.SIGNED_SIZE_SQL)
    if size > signed:
        raise NotFound(f"parameter {name}: no checkpoint covers tree size {size} yet"
                       + (f"; the latest is of size {signed}" if signed else "; none has been signed yet"))


async def get_inclusion_proof(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    index = param(request, "index", EntryIndex, query=True)
    tree_size = param(request, "tree_size", TreeSize, query=True)
    if index >= tree_size:
        raise ValidationFailed(f"parameter index: {index} is not below tree_size {tree_size}", field="index")
    pool = request.app[POOL]
    await _signed_size(pool, "tree_size", tree_size)
    get = await store.subtree_getter(pool, merkle.inclusion_subtrees(index, tree_size))
    path = merkle.inclusion_proof(index, tree_size, get)
    return json_response(InclusionProof(index=index, tree_size=tree_size, leaf_hash=_b64(get(0, index)),
                                        path=[_b64(h) for h in path]))


async def get_consistency_proof(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    first = param(request, "first", TreeSize, query=True)
    second = param(request, "second", TreeSize, query=True)
    if first > second:
        raise ValidationFailed(f"parameter first: {first} is above second ({second})", field="first")
    pool = request.app[POOL]
    await _signed_size(pool, "second", second)
    get = await store.subtree_getter(pool, merkle.consistency_subtrees(first, second))
    path = merkle.consistency_proof(first, second, get)
    return json_response(ConsistencyProof(first=first, second=second, path=[_b64(h) for h in path]))


async def get_checkpoint(request: web.Request) -> web.Response:
    row = await request.app[POOL].fetchrow(store.LATEST_CHECKPOINT_SQL)
    if row is None:
        raise NotFound("no checkpoint has been signed yet: the journal is empty")
    return web.Response(text=row["note"], content_type=TEXT_PLAIN, charset="utf-8")


async def list_checkpoints(request: web.Request) -> web.Response:
    require(principal(request), "admin", "auditor")
    start = param(request, "start", CheckpointStart, query=True, default=0)
    limit = param(request, "limit", CheckpointsLimit, query=True, default=CHECKPOINTS_LIMIT_DEFAULT)
    rows = await request.app[POOL].fetch(store.LIST_CHECKPOINTS_SQL, start, limit)
    return json_response(Checkpoints(checkpoints=[
        CheckpointView(tree_size=r["tree_size"], note=r["note"], signed_at=r["signed_at"]) for r in rows]))


async def get_log_key(request: web.Request) -> web.Response:
    return web.Response(text=request.app[LOG_KEY].verifier() + "\n", content_type=TEXT_PLAIN, charset="utf-8")


async def auditor_page(request: web.Request) -> web.Response:
    settings = request.app[http.SETTINGS]
    async with request.app[POOL].acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        data = await store.page_data(conn, PAGE_REPORTS_MAX, PAGE_ENTRIES)
    text = page.render(data._replace(verifier_key=request.app[LOG_KEY].verifier(),
                                     base_url=f"http://{settings.host}:{settings.port}"))
    # No script, no remote resources: the page's only style is inline.
    return web.Response(text=text, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
                                 "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


ROUTES: Final = [
    Route("GET", "/v1/accounts/{account}", get_account, "An account's debits, credits and balance",
          ("admin", "auditor"), None, Account, params={"account": domain.AccountName}),
    Route("GET", "/v1/reports/cities/{city}/{year}", get_city_report,
          "A city's budget, issued, redeemed, refunded, revoked, expired, outstanding and available for a year",
          ("admin", "auditor", "issuer"), None, CityReport, params={"city": CityId, "year": Year}),
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
          "text/plain: the latest checkpoint, a C2SP tlog-checkpoint in a signed note (Ed25519); public"),
    Route("GET", "/v1/log/key", get_log_key, "text/plain: the log's C2SP verifier key; public"),
    Route("GET", "/", auditor_page, "text/html: the auditor's page (aggregate figures, checkpoint, how to verify)"),
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[POOL], probe))
    app[LOG_KEY] = notes.load_log_key(settings.run_dir, notes.origin_from_env())
    log.info("checkpoints are signed with the log key", extra={"verifier_key": app[LOG_KEY].verifier()})

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        consumer = Consumer(settings, pool, topics=[settings.topic_issuing, settings.topic_redemption],
                            group=CONSUMER_GROUP, handler=journal)
        app[POOL], app[CONSUMER] = pool, consumer
        consumer_task = asyncio.create_task(consumer.run(), name="ledger-consumer")
        background = [asyncio.create_task(_refresh_log_status(pool), name="log-status"),
                      asyncio.create_task(_sign_checkpoints(pool, app[LOG_KEY]), name="checkpoint-signer")]
        yield
        # Drain: the consumer finishes (commits) the batch in hand and stops polling; then the pool closes.
        await tasks.stop_within(consumer.stop, consumer_task, SHUTDOWN_TIMEOUT_S,
                                "the consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.cancel_all(background)
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
