"""Redemption service HTTP edge: routes, roles, and the wiring of pool, issuing consumer and outbox relay."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final

import asyncpg
from aiohttp import web

from schemas.common import Uuid
from schemas.redemption import Redemption, RedemptionIn, VoucherView

from services.common import db, http, kafka, metrics, outbox
from services.common.auth import require
from services.common.consumer import Consumer
from services.common.errors import NotFound, ServiceError
from services.common.http import Route, json_response, param, principal
from services.common.settings import READY_CHECK_TIMEOUT_S, Settings

from . import domain, store

log = logging.getLogger("cvl.redemption")

SCHEMA: Final = "redemption"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "redemption"
CONSUMER_DRAIN_S: Final = 10.0   # a stopping consumer finishes its batch (one poll of CONSUMER_POLL_MS + one commit)
RELAY_DRAIN_S: Final = 15.0      # the relay publishes what is committed before the pool closes
POOL: Final = web.AppKey("pool", asyncpg.Pool)
RELAY: Final = web.AppKey("relay", outbox.Relay)
CITY_UNKNOWN: Final = "unknown"  # metrics label when a refusal came before the voucher was found


async def redeem(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider")
    assert who.provider is not None, "a provider token always names its provider"
    raw = await http.read_body(request)
    body = http.decode(raw, RedemptionIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.RedeemAttempt()

    async def command(conn: asyncpg.Connection):
        redemption = await store.redeem(conn, body, provider=who.provider, actor=who.subject,
                                        topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)
        return 201, redemption

    try:
        response = await http.run_command(request.app[POOL], key, command)
    except ServiceError as refusal:
        if attempt.city is not None or isinstance(refusal, NotFound):
            metrics.redemptions.labels(attempt.city or CITY_UNKNOWN, refusal.code).inc()
        raise
    if attempt.redemption is not None:  # None: a replay of an earlier response, nothing changed now
        request.app[RELAY].wake()
        assert attempt.city is not None
        metrics.redemptions.labels(attempt.city, "ok").inc()
        metrics.amount_redeemed.labels(attempt.city).inc(attempt.redemption.amount)
    return response


async def get_voucher(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin")
    voucher_id = param(request, "voucher_id", Uuid)
    row = await request.app[POOL].fetchrow(store.GET_VOUCHER_SQL, voucher_id, who.provider)
    if row is None:
        raise NotFound(f"no voucher {voucher_id}")
    voucher = store.voucher_state(row)
    if who.role == "provider":
        assert who.provider is not None
        domain.check_provider_eligible(voucher, who.provider, row["provider_cities"])
    return json_response(store.voucher_view(voucher, outbox.now()))


ROUTES: Final = [
    Route("POST", "/v1/redemptions", redeem, "Redeem part of a voucher now, as the token's provider", ("provider",),
          RedemptionIn, Redemption, 201),
    Route("GET", "/v1/vouchers/{voucher_id}", get_voucher, "A voucher's balance, as an eligible provider sees it",
          ("provider", "admin"), None, VoucherView, params={"voucher_id": Uuid}),
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
        relay = outbox.Relay(settings, SCHEMA)
        consumer = Consumer(settings, pool, topics=[settings.topic_issuing], group=CONSUMER_GROUP,
                            handler=store.apply_issuing_events)
        app[POOL], app[RELAY] = pool, relay
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        consumer_task = asyncio.create_task(consumer.run(), name="issuing-consumer")
        sweeper = asyncio.create_task(http.sweep_idempotency_keys(pool), name="idempotency-sweeper")
        yield
        # Drain in dependency order (requests have finished): the consumer commits its batch, the relay publishes
        # what is committed, then the pool closes.
        await consumer.stop()
        try:
            await asyncio.wait_for(consumer_task, CONSUMER_DRAIN_S)
        except TimeoutError:
            log.error("issuing consumer did not stop in time; its uncommitted batch will be redelivered")
        await relay.stop()
        try:
            await asyncio.wait_for(relay_task, RELAY_DRAIN_S)
        except TimeoutError:
            log.error("outbox relay did not drain in time; rows stay in the outbox for the next start")
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
