"""Issuing service HTTP edge: routes, roles, and the wiring of pool, writers and relay."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
from aiohttp import web

from schemas import events as ev
from schemas.common import CityId, ProviderId, Uuid, Year
from schemas.issuing import (
    BatchMintIn, BatchMintOut, Budget, BudgetIn, City, CityIn, MintIn, Provider, ProviderIn, RevokeIn, Voucher,
)

from services.common import db, http, idempotency, kafka, metrics, outbox, tasks
from services.common.auth import require
from services.common.consumer import Consumer, Delivered
from services.common.errors import BudgetBelowCommitted, NotFound, ValidationFailed, VoucherExpired
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings
from schemas.limits import CONSUMER_DRAIN_S, RELAY_DRAIN_S

from . import rule_metrics, store
from .writer import Writers

log = logging.getLogger("cvl.issuing")

SCHEMA: Final = "issuing"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
POOL: Final = web.AppKey("pool", asyncpg.Pool)
WRITERS: Final = web.AppKey("writers", Writers)
RELAY: Final = web.AppKey("relay", outbox.Relay)
CONSUMER_GROUP: Final = "issuing"  # reads the redemption topic: what revocations and expiries gave back

_encoder = msgspec.json.Encoder()


def _mint_response(command: store.MintCommand) -> bytes:
    if command.batch:
        return _encoder.encode(BatchMintOut(vouchers=command.minted))
    return _encoder.encode(command.minted[0])


def _check_future(vouchers: list[MintIn], prefix: str) -> None:
    now = outbox.now()
    for i, v in enumerate(vouchers):
        if v.expires_at <= now:
            raise ValidationFailed("expires_at must be in the future", field=f"{prefix}{i}].expires_at"
                                   if prefix else "expires_at")


# --- cities, budgets, providers ------------------------------------------------------------------------------------

async def put_city(request: web.Request) -> web.Response:
    require(principal(request), "admin")
    city = param(request, "city", CityId)
    body = http.decode(await http.read_body(request), CityIn)
    settings = request.app[http.SETTINGS]

    async def command(conn: asyncpg.Connection):
        if await conn.fetchval(store.UPSERT_CITY_SQL, city, body.name, body.currency):
            data = ev.CitySetData(city=city, name=body.name, currency=body.currency)
            await outbox.append(conn, [(settings.topic_issuing, city, outbox.envelope(
                ev.CitySet, data, producer="issuing", actor=principal(request).subject))])
        return 200, City(city=city, name=body.name, currency=body.currency)

    response = await http.run_command(request.app[POOL], None, command)
    request.app[RELAY].wake()
    return response


async def put_budget(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin")
    city = param(request, "city", CityId)
    year = param(request, "year", Year)
    body = http.decode(await http.read_body(request), BudgetIn)
    settings = request.app[http.SETTINGS]

    async def command(conn: asyncpg.Connection):
        # Lock the city row first: every city-keyed event is written under it, so its outbox order is commit order.
        if await conn.fetchval(store.LOCK_CITY_SQL, city) is None:
            raise NotFound(f"no city {city}; create it with PUT /v1/cities/{city}")
        row = await conn.fetchrow(store.INSERT_BUDGET_SQL, city, year, body.amount, body.enterprise_cap,
                                  body.year_end)
        previous, committed = 0, 0
        if row is None:
            current = await conn.fetchrow(store.LOCK_BUDGET_SQL, city, year)
            previous, committed = current["amount"], current["committed"]
            unchanged = (current["amount"], current["enterprise_cap"], current["year_end"]) == (
                body.amount, body.enterprise_cap, body.year_end)
            if not unchanged:
                if body.amount < committed:
                    raise BudgetBelowCommitted(
                        f"{city} {year} has {committed} committed; the budget cannot be {body.amount}", field="amount")
                updated = await conn.fetchrow(store.UPDATE_BUDGET_SQL, city, year, body.amount, body.enterprise_cap,
                                              body.year_end)
                assert updated is not None and updated["committed"] <= updated["amount"]
        else:
            unchanged = False
        if not unchanged:
            data = ev.BudgetSetData(city=city, year=year, amount=body.amount, previous_amount=previous,
                                    delta=body.amount - previous, committed=committed,
                                    enterprise_cap=body.enterprise_cap, year_end=body.year_end)
            await outbox.append(conn, [(settings.topic_issuing, city, outbox.envelope(
                ev.BudgetSet, data, producer="issuing", actor=who.subject))])
        return 200, store.budget_view(await conn.fetchrow(store.GET_BUDGET_SQL, city, year))

    response = await http.run_command(request.app[POOL], None, command)
    request.app[RELAY].wake()
    return response


async def get_budget(request: web.Request) -> web.Response:
    city = param(request, "city", CityId)
    require(principal(request), "admin", "issuer", "auditor", city=city)
    year = param(request, "year", Year)
    row = await request.app[POOL].fetchrow(store.GET_BUDGET_SQL, city, year)
    if row is None:
        raise NotFound(f"city {city} has no budget for {year}")
    budget = store.budget_view(row)
    assert budget.committed + budget.available == budget.amount
    return json_response(budget)


async def put_provider(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin")
    provider = param(request, "provider", ProviderId)
    body = http.decode(await http.read_body(request), ProviderIn)
    cities = sorted(set(body.cities))
    settings = request.app[http.SETTINGS]

    async def command(conn: asyncpg.Connection):
        known = {r["city"] for r in await conn.fetch(store.KNOWN_CITIES_SQL, cities)}
        for i, city in enumerate(body.cities):
            if city not in known:
                raise ValidationFailed(f"no city {city}", field=f"cities[{i}]")
        if await conn.fetchval(store.UPSERT_PROVIDER_SQL, provider, body.name, cities):
            data = ev.ProviderSetData(provider=provider, name=body.name, cities=cities)
            await outbox.append(conn, [(settings.topic_issuing, provider, outbox.envelope(
                ev.ProviderSet, data, producer="issuing", actor=who.subject))])
        return 200, Provider(provider=provider, name=body.name, cities=cities)

    response = await http.run_command(request.app[POOL], None, command)
    request.app[RELAY].wake()
    return response


# --- vouchers -----------------------------------------------------------------------------------------------------

async def _mint(request: web.Request, vouchers: list[MintIn], raw: bytes, *, batch: bool) -> web.Response:
    who = principal(request)
    for v in vouchers:
        require(who, "issuer", city=v.city)
    key = http.idempotency_key(request, who, raw)
    if key is not None and (stored := await idempotency.lookup(request.app[POOL], key)) is not None:
        return http.answer(stored)
    # After the replay lookup: a retry of a mint whose expires_at has passed since still gets its first answer.
    _check_future(vouchers, "vouchers[" if batch else "")
    budgets = {(v.city, v.year) for v in vouchers}
    writer_key = next(iter(budgets)) if len(budgets) == 1 else None
    for _attempt in range(3):
        command = await request.app[WRITERS].submit(
            writer_key, store.MintCommand(vouchers=vouchers, actor=who.subject, key=key, batch=batch))
        if command.refusal is not None:
            raise command.refusal
        if not command.replay:
            return web.Response(body=_mint_response(command), status=201, content_type=http.JSON)
        if (stored := await idempotency.lookup(request.app[POOL], key)) is not None:
            return http.answer(stored)
        # The key's first use was refused and released in the same batch: run this one for real.
    raise ValidationFailed("the Idempotency-Key is being used by concurrent requests", field="Idempotency-Key")


async def mint(request: web.Request) -> web.Response:
    raw = await http.read_body(request)
    body = http.decode(raw, MintIn)
    return await _mint(request, [body], raw, batch=False)


async def mint_batch(request: web.Request) -> web.Response:
    raw = await http.read_body(request)
    body = http.decode(raw, BatchMintIn)
    return await _mint(request, body.vouchers, raw, batch=True)


async def get_voucher(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin", "issuer", city=who.city)
    voucher_id = param(request, "voucher_id", Uuid)
    row = await request.app[POOL].fetchrow(store.GET_VOUCHER_SQL, voucher_id)
    if row is None:
        raise NotFound(f"no voucher {voucher_id}")
    require(who, "admin", "issuer", city=row["city"])
    return json_response(store.voucher_view(row))


async def revoke(request: web.Request) -> web.Response:
    """The issuer revokes a voucher: the saga's first step (see `apply_redemption_events` for its last).

    The voucher is marked revoked here at once and VoucherRevoked (returned 0: an intent) goes out. The redemption
    service freezes the voucher when it consumes that event (no holds or redemptions after; open holds voided) and
    announces the unspent balance as VoucherFrozen; this service then returns it to the budget. Revoking a revoked
    voucher answers the same voucher again and changes nothing; an expired voucher cannot be revoked.
    """
    who = principal(request)
    require(who, "issuer", city=who.city)
    voucher_id = param(request, "voucher_id", Uuid)
    raw = await http.read_body(request)
    body = http.decode(raw, RevokeIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    revoked: list[Voucher] = []

    async def command(conn: asyncpg.Connection):
        row = await conn.fetchrow(store.LOCK_VOUCHER_SQL, voucher_id)
        if row is None:
            raise NotFound(f"no voucher {voucher_id}")
        require(who, "issuer", city=row["city"])
        if row["status"] == "revoked":
            return 200, store.voucher_view(row)
        if row["status"] == "expired":
            raise VoucherExpired(f"voucher {voucher_id} has expired; there is nothing left to revoke")
        now = outbox.now()
        updated = await conn.fetchrow(store.REVOKE_VOUCHER_SQL, voucher_id, body.reason, now)
        assert updated is not None and updated["status"] == "revoked"
        data = ev.VoucherRevokedData(voucher_id=voucher_id, city=row["city"], year=row["year"], reason=body.reason,
                                     returned=0)
        await outbox.append(conn, [(settings.topic_issuing, voucher_id, outbox.envelope(
            ev.VoucherRevoked, data, producer="issuing", actor=who.subject, occurred_at=now))])
        view = store.voucher_view(updated)
        revoked.append(view)
        return 200, view

    response = await http.run_command(request.app[POOL], key, command)
    if revoked:
        request.app[RELAY].wake()
        rule_metrics.revocations.labels(revoked[0].city, str(revoked[0].year)).inc()
    return response


async def apply_redemption_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> None:
    """Consumer handler: the saga's last step (VoucherFrozen) and expiry's return (VoucherExpired with carry)."""
    settled = await store.apply_redemption_events(conn, delivered)
    for voucher_id in settled.unknown:
        rule_metrics.unknown_vouchers.inc()
        log.error("redemption event for a voucher this service never minted; skipped",
                  extra={"voucher_id": voucher_id})
    for (city, year), (amount, committed) in settled.budgets.items():
        metrics.budget_available.labels(city, str(year)).set(amount - committed)


ROUTES: Final = [
    Route("PUT", "/v1/cities/{city}", put_city, "Create or update a city", ("admin",), CityIn, City,
          params={"city": CityId}),
    Route("PUT", "/v1/cities/{city}/budgets/{year}", put_budget, "Set a city's annual budget", ("admin",), BudgetIn,
          Budget, params={"city": CityId, "year": Year}),
    Route("GET", "/v1/cities/{city}/budgets/{year}", get_budget, "A budget with committed and available",
          ("admin", "issuer", "auditor"), None, Budget, params={"city": CityId, "year": Year}),
    Route("PUT", "/v1/providers/{provider}", put_provider, "Whitelist a compute provider for cities", ("admin",),
          ProviderIn, Provider, params={"provider": ProviderId}),
    Route("POST", "/v1/vouchers", mint, "Mint a voucher within the budget", ("issuer",), MintIn, Voucher, 201),
    Route("POST", "/v1/vouchers/batch", mint_batch, "Mint up to 1000 vouchers, all or nothing", ("issuer",),
          BatchMintIn, BatchMintOut, 201),
    Route("GET", "/v1/vouchers/{voucher_id}", get_voucher, "A voucher", ("admin", "issuer"), None, Voucher,
          params={"voucher_id": Uuid}),
    Route("POST", "/v1/vouchers/{voucher_id}/revoke", revoke,
          "Revoke a voucher: it is frozen for redemption and its unspent balance returns to the budget",
          ("issuer",), RevokeIn, Voucher, params={"voucher_id": Uuid}),
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[POOL], probe))

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        relay = outbox.Relay(settings, SCHEMA)
        writers = Writers(pool, producer="issuing", topic=settings.topic_issuing, encode=_mint_response,
                          on_commit=relay.wake)
        consumer = Consumer(settings, pool, topics=[settings.topic_redemption], group=CONSUMER_GROUP,
                            handler=apply_redemption_events)
        app[POOL], app[RELAY], app[WRITERS] = pool, relay, writers
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        consumer_task = asyncio.create_task(consumer.run(), name="redemption-consumer")
        sweeper = asyncio.create_task(idempotency.sweep_forever(pool), name="idempotency-sweeper")
        yield
        # Drain in dependency order: writers commit what is queued, the consumer its batch, the relay publishes
        # what is committed, then the pool closes.
        await writers.close()
        await tasks.stop_within(consumer.stop, consumer_task, CONSUMER_DRAIN_S,
                                "redemption consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.stop_within(relay.stop, relay_task, RELAY_DRAIN_S,
                                "outbox relay did not drain in time; rows stay in the outbox for the next start")
        await tasks.cancel_all([sweeper])
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app

