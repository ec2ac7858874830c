"""Redemption service HTTP edge: routes, roles, and the wiring of pool, issuing consumer, sweepers and outbox relay."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from schemas.common import ProviderId, Timestamp, Uuid
from schemas.redemption import (
    CaptureIn, Hold, HoldIn, Redemption, RedemptionDetail, RedemptionIn, Refund, RefundIn, Statement, VoidIn,
    VoucherView,
)

from services.common import db, http, idempotency, kafka, metrics, outbox, tasks
from services.common.auth import require
from services.common.consumer import Consumer, Delivered
from services.common.errors import NotFound, ServiceError, ValidationFailed
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings
from schemas.limits import CONSUMER_DRAIN_S, RELAY_DRAIN_S

from . import domain, rule_metrics, store, sweeper

log = logging.getLogger("cvl.redemption")

SCHEMA: Final = "redemption"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "redemption"
POOL: Final = web.AppKey("pool", asyncpg.Pool)
RELAY: Final = web.AppKey("relay", outbox.Relay)
CITY_UNKNOWN: Final = "unknown"  # metrics label when a refusal came before the voucher was found


def _provider(request: web.Request) -> tuple[Any, str]:
    who = principal(request)
    require(who, "provider")
    assert who.provider is not None, "a provider token always names its provider"
    return who, who.provider


async def _command(request: web.Request, key: idempotency.Key | None,
                   command: Callable[[asyncpg.Connection], Awaitable[tuple[int, Any]]],
                   refused: Callable[[ServiceError], None]) -> web.Response:
    """Run a provider command (one transaction, Idempotency-Key honoured); count a refusal; wake the relay."""
    try:
        response = await http.run_command(request.app[POOL], key, command)
    except ServiceError as refusal:
        refused(refusal)
        raise
    request.app[RELAY].wake()
    return response


def _optional_body(raw: bytes, type_: type) -> Any:
    """Capture and void take an optional body: none (or only whitespace) reads as {}."""
    return http.decode(raw, type_) if raw.strip() else type_()


# --- redemptions -----------------------------------------------------------------------------------------------------

async def redeem(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    raw = await http.read_body(request)
    body = http.decode(raw, RedemptionIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.RedeemAttempt()

    async def command(conn: asyncpg.Connection):
        redemption = await store.redeem(conn, body, provider=provider, actor=who.subject,
                                        topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)
        return 201, redemption

    def refused(refusal: ServiceError) -> None:
        if attempt.city is not None or isinstance(refusal, NotFound):
            metrics.redemptions.labels(attempt.city or CITY_UNKNOWN, refusal.code).inc()

    response = await _command(request, key, command, refused)
    if attempt.redemption is not None:  # None: a replay of an earlier response, nothing changed now
        assert attempt.city is not None
        metrics.redemptions.labels(attempt.city, "ok").inc()
        metrics.amount_redeemed.labels(attempt.city).inc(attempt.redemption.amount)
    return response


async def get_redemption(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin", "auditor")
    redemption_id = param(request, "redemption_id", Uuid)
    row = await request.app[POOL].fetchrow(store.GET_REDEMPTION_SQL, redemption_id)
    if row is None or (who.role == "provider" and row["provider"] != who.provider):
        raise NotFound(f"no redemption {redemption_id}")
    return json_response(store.redemption_detail(row))


async def refund(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    redemption_id = param(request, "redemption_id", Uuid)
    raw = await http.read_body(request)
    body = http.decode(raw, RefundIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.RefundAttempt()

    async def command(conn: asyncpg.Connection):
        return 201, await store.refund(conn, redemption_id, body, provider=provider, actor=who.subject,
                                       topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)

    def refused(refusal: ServiceError) -> None:
        rule_metrics.refunds.labels(attempt.city or CITY_UNKNOWN, refusal.code).inc()

    response = await _command(request, key, command, refused)
    if attempt.refund is not None:
        assert attempt.city is not None
        rule_metrics.refunds.labels(attempt.city, attempt.refund.returned_to).inc()
        rule_metrics.amount_refunded.labels(attempt.city).inc(attempt.refund.amount)
    return response


# --- holds -----------------------------------------------------------------------------------------------------------

def _count_hold(attempt: store.HoldAttempt) -> None:
    if attempt.outcome is None:  # a replay: nothing changed now
        return
    city = attempt.city or CITY_UNKNOWN
    rule_metrics.holds.labels(city, attempt.outcome).inc()
    if attempt.amount:
        rule_metrics.hold_amount.labels(city, "placed" if attempt.outcome == "placed" else "captured").inc(
            attempt.amount)
    if attempt.released:
        rule_metrics.hold_amount.labels(city, "released").inc(attempt.released)


def _hold_refused(attempt: store.HoldAttempt) -> Callable[[ServiceError], None]:
    def refused(refusal: ServiceError) -> None:
        rule_metrics.holds.labels(attempt.city or CITY_UNKNOWN, refusal.code).inc()
    return refused


async def place_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    raw = await http.read_body(request)
    body = http.decode(raw, HoldIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.HoldAttempt()

    async def command(conn: asyncpg.Connection):
        return 201, await store.place_hold(conn, body, provider=provider, actor=who.subject,
                                           topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)

    response = await _command(request, key, command, _hold_refused(attempt))
    _count_hold(attempt)
    return response


async def capture_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    hold_id = param(request, "hold_id", Uuid)
    raw = await http.read_body(request)
    body = _optional_body(raw, CaptureIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.HoldAttempt()

    async def command(conn: asyncpg.Connection):
        return 200, await store.capture_hold(conn, hold_id, body, provider=provider, actor=who.subject,
                                             topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)

    response = await _command(request, key, command, _hold_refused(attempt))
    _count_hold(attempt)
    if attempt.outcome is not None:
        metrics.redemptions.labels(attempt.city, "ok").inc()
        metrics.amount_redeemed.labels(attempt.city).inc(attempt.amount)
    return response


async def void_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    hold_id = param(request, "hold_id", Uuid)
    raw = await http.read_body(request)
    _optional_body(raw, VoidIn)
    key = http.idempotency_key(request, who, raw)
    settings = request.app[http.SETTINGS]
    attempt = store.HoldAttempt()

    async def command(conn: asyncpg.Connection):
        return 200, await store.void_hold(conn, hold_id, provider=provider, actor=who.subject,
                                          topic=settings.topic_redemption, now=outbox.now(), attempt=attempt)

    response = await _command(request, key, command, _hold_refused(attempt))
    _count_hold(attempt)
    return response


async def get_hold(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin")
    hold_id = param(request, "hold_id", Uuid)
    row = await request.app[POOL].fetchrow(store.GET_HOLD_SQL, hold_id)
    if row is None:
        raise NotFound(f"no hold {hold_id}")
    if who.role == "provider":
        domain.check_hold_owner(store.hold_state(row), who.provider)
    return json_response(store.hold_view(row, outbox.now()))


# --- vouchers and statements -----------------------------------------------------------------------------------------

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


def _time_param(request: web.Request, name: str) -> dt.datetime | None:
    """An RFC 3339 query parameter; a '+' of the offset that arrived as a space (unencoded) is taken as '+'."""
    raw = request.rel_url.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return msgspec.convert(raw.replace(" ", "+"), Timestamp, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(f"parameter {name}: {exc} (RFC 3339 with an offset, e.g. 2026-03-01T00:00:00Z)",
                               field=name) from exc


async def get_statement(request: web.Request) -> web.Response:
    who = principal(request)
    provider = param(request, "provider", ProviderId)
    require(who, "provider", "auditor", provider=provider)
    start, end = _time_param(request, "from"), _time_param(request, "to")
    if start is not None and end is not None and end < start:
        raise ValidationFailed("to must not be before from", field="to")
    city = who.city if who.role == "auditor" else None
    async with request.app[POOL].acquire() as conn:
        return json_response(await store.statement(conn, provider, start, end, city))


ROUTES: Final = [
    Route("POST", "/v1/redemptions", redeem, "Redeem part of a voucher now, as the token's provider", ("provider",),
          RedemptionIn, Redemption, 201),
    Route("GET", "/v1/redemptions/{redemption_id}", get_redemption,
          "A redemption (or captured hold) with what was refunded of it", ("provider", "admin", "auditor"), None,
          RedemptionDetail, params={"redemption_id": Uuid}),
    Route("POST", "/v1/redemptions/{redemption_id}/refund", refund,
          "Return up to the redeemed amount (in total) to the voucher, as the provider that redeemed", ("provider",),
          RefundIn, Refund, 201, params={"redemption_id": Uuid}),
    Route("POST", "/v1/holds", place_hold, "Reserve part of a voucher until captured, voided or timed out",
          ("provider",), HoldIn, Hold, 201),
    Route("GET", "/v1/holds/{hold_id}", get_hold, "A hold", ("provider", "admin"), None, Hold,
          params={"hold_id": Uuid}),
    Route("POST", "/v1/holds/{hold_id}/capture", capture_hold,
          "Capture up to the held amount (all when omitted); the rest is released", ("provider",), CaptureIn, Hold,
          params={"hold_id": Uuid}),
    Route("POST", "/v1/holds/{hold_id}/void", void_hold, "Release a hold", ("provider",), VoidIn, Hold,
          params={"hold_id": Uuid}),
    Route("GET", "/v1/vouchers/{voucher_id}", get_voucher, "A voucher's balance, as an eligible provider sees it",
          ("provider", "admin"), None, VoucherView, params={"voucher_id": Uuid}),
    Route("GET", "/v1/providers/{provider}/statement", get_statement,
          "A provider's redemptions and refunds in [from, to) with totals equal to its ledger account's movements",
          ("provider", "auditor"), None, Statement,
          params={"provider": ProviderId, "from": Timestamp, "to": Timestamp}),
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[POOL], probe))

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        relay = outbox.Relay(settings, SCHEMA)

        async def apply_issuing_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> None:
            outcome = await store.apply_issuing_events(conn, delivered, topic=settings.topic_redemption,
                                                       now=outbox.now())
            for city, returned in outcome.frozen:
                rule_metrics.vouchers_frozen.labels(city).inc()
                rule_metrics.amount_frozen.labels(city).inc(returned)
            for voucher_id in outcome.unknown_revocations:
                rule_metrics.unknown_revocations.inc()
                log.error("revocation of a voucher never minted here; skipped", extra={"voucher_id": voucher_id})
            if outcome.frozen:
                relay.wake()  # before the commit: the relay's next poll (OUTBOX_IDLE_POLL_S) publishes at the latest

        consumer = Consumer(settings, pool, topics=[settings.topic_issuing], group=CONSUMER_GROUP,
                            handler=apply_issuing_events)
        app[POOL], app[RELAY] = pool, relay
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        consumer_task = asyncio.create_task(consumer.run(), name="issuing-consumer")
        background = [asyncio.create_task(idempotency.sweep_forever(pool), name="idempotency-sweeper"),
                      *sweeper.start(pool, settings, relay.wake)]
        yield
        # Drain in dependency order (requests have finished): the sweepers stop (a round in flight rolls back), the
        # consumer commits its batch, the relay publishes what is committed, then the pool closes.
        await tasks.cancel_all(background)
        await tasks.stop_within(consumer.stop, consumer_task, CONSUMER_DRAIN_S,
                                "issuing consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.stop_within(relay.stop, relay_task, RELAY_DRAIN_S,
                                "outbox relay did not drain in time; rows stay in the outbox for the next start")
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
