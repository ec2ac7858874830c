"""Ledger service HTTP edge: routes, roles, and the wiring of the pool and the journal's consumer.

The ledger only reads events and writes its own tables: it produces no events, so it has no outbox relay.
Roles: admin and auditor read the ledger; an auditor scoped to a city sees only that city's accounts and report
(not provider accounts, which span cities, nor the trial balance and entries, which cover every city); the issuer
of a city may also read that city's report.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path
from typing import Annotated, Final

import asyncpg
from aiohttp import web
from msgspec import Meta
from prometheus_client import Gauge

from schemas.common import CityId, Year
from schemas.ledger import Account, CityReport, Entries, TrialBalance

from services.common import db, http, kafka, metrics
from services.common.auth import Principal, require
from services.common.consumer import Consumer, Delivered
from services.common.errors import Forbidden, NotFound
from services.common.http import Route, json_response, param, principal
from services.common.settings import READY_CHECK_TIMEOUT_S, SHUTDOWN_TIMEOUT_S, Settings

from . import domain, store

log = logging.getLogger("cvl.ledger")

SERVICE: Final = "ledger"
SCHEMA: Final = "ledger"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "ledger"
ENTRIES_LIMIT_MAX: Final = 1000          # entries one GET /v1/entries returns at most
ENTRIES_LIMIT_DEFAULT: Final = 100
ENTRY_INDEX_MAX: Final = 2**63 - 1       # bigint
JOURNAL_SIZE_REFRESH_S: Final = 5.0      # every replica's gauge follows appends made by the others

POOL: Final = web.AppKey("pool", asyncpg.Pool)
CONSUMER: Final = web.AppKey("consumer", Consumer)

journal_size = Gauge("cvl_ledger_journal_size_entries", "Entries in the journal (the Merkle tree size)")

EntryIndex = Annotated[int, Meta(ge=0, le=ENTRY_INDEX_MAX, description="An entry index (leaf position, from 0)")]
EntriesLimit = Annotated[int, Meta(ge=1, le=ENTRIES_LIMIT_MAX, description="How many entries, at most")]


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


async def _refresh_journal_size(pool: asyncpg.Pool) -> None:
    while True:
        try:
            journal_size.set(await pool.fetchval(store.HEAD_SQL))
        except Exception:
            log.exception("reading the journal size failed")
        await asyncio.sleep(JOURNAL_SIZE_REFRESH_S)


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
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    async def ready() -> dict[str, bool]:
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
                pg = await app[POOL].fetchval("SELECT true")
        except Exception:
            pg = False
        return {"postgres": bool(pg), "kafka": await probe.ping()}

    app = http.base_app(settings, ROUTES, ready)

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        consumer = Consumer(settings, pool, topics=[settings.topic_issuing, settings.topic_redemption],
                            group=CONSUMER_GROUP, handler=journal)
        app[POOL], app[CONSUMER] = pool, consumer
        consumer_task = asyncio.create_task(consumer.run(), name="ledger-consumer")
        refresher = asyncio.create_task(_refresh_journal_size(pool), name="journal-size")
        yield
        # Drain: the consumer finishes (commits) the batch in hand and stops polling; then the pool closes.
        await consumer.stop()
        try:
            await asyncio.wait_for(consumer_task, SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.error("the consumer did not stop in time; its uncommitted batch will be redelivered")
        refresher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refresher
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
