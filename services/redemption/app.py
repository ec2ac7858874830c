"""Redemption service HTTP edge: routes, roles, and the wiring of pool, redemption writer, issuing consumer, sweepers
and outbox relay."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from schemas.common import ProviderId, Timestamp, Uuid
from schemas.limits import CONSUMER_DRAIN_S, RELAY_DRAIN_S
from schemas.redemption import (
    CaptureIn, Hold, HoldIn, Redemption, RedemptionDetail, RedemptionIn, RedemptionPage, Refund, RefundIn, Statement,
    VoidIn, VoucherView,
)

from services.common import db, http, idempotency, kafka, outbox, paging, processed_events, tasks
from services.common.auth import Principal, require
from services.common.consumer import Consumer, Delivered, of_types
from services.common.errors import ValidationFailed
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings

from . import commands, queries, sweeper
from .writer import Redemptions

log = logging.getLogger("cvl.redemption")

SCHEMA: Final = "redemption"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
CONSUMER_GROUP: Final = "redemption"
COMMANDS: Final = web.AppKey("commands", commands.Service)


def _provider(request: web.Request) -> tuple[Principal, str]:
    who = principal(request)
    require(who, "provider")
    assert who.provider is not None, "a provider token always names its provider"
    return who, who.provider


def _as_provider(who: Principal) -> str | None:
    """The provider a read is scoped to: a provider sees its own; admins and auditors are not scoped by provider."""
    return who.provider if who.role == "provider" else None


def _optional_body(raw: bytes, type_: type) -> Any:
    """Capture and void take an optional body: none (or only whitespace) reads as {}."""
    return http.decode(raw, type_) if raw.strip() else type_()


# --- redemptions -----------------------------------------------------------------------------------------------------

async def redeem(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    raw = await http.read_body(request)
    body = http.decode(raw, RedemptionIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.redeem(request.app[COMMANDS], key, body, provider=provider,
                                             actor=who.subject, now=outbox.now()))


async def get_redemption(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin", "auditor")
    redemption_id = param(request, "redemption_id", Uuid)
    return json_response(await commands.redemption(request.app[COMMANDS].pool, redemption_id,
                                                    provider=_as_provider(who)))


async def refund(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    redemption_id = param(request, "redemption_id", Uuid)
    raw = await http.read_body(request)
    body = http.decode(raw, RefundIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.refund(request.app[COMMANDS], key, redemption_id, body, provider=provider,
                                             actor=who.subject, now=outbox.now()))


# --- holds -----------------------------------------------------------------------------------------------------------

async def place_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    raw = await http.read_body(request)
    body = http.decode(raw, HoldIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.place_hold(request.app[COMMANDS], key, body, provider=provider,
                                                 actor=who.subject, now=outbox.now()))


async def capture_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    hold_id = param(request, "hold_id", Uuid)
    raw = await http.read_body(request)
    body = _optional_body(raw, CaptureIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.capture_hold(request.app[COMMANDS], key, hold_id, body, provider=provider,
                                                   actor=who.subject, now=outbox.now()))


async def void_hold(request: web.Request) -> web.Response:
    who, provider = _provider(request)
    hold_id = param(request, "hold_id", Uuid)
    raw = await http.read_body(request)
    _optional_body(raw, VoidIn)  # validated only: a void carries nothing yet
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.void_hold(request.app[COMMANDS], key, hold_id, provider=provider,
                                                actor=who.subject, now=outbox.now()))


async def get_hold(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin")
    hold_id = param(request, "hold_id", Uuid)
    return json_response(await commands.hold(request.app[COMMANDS].pool, hold_id, provider=_as_provider(who),
                                             now=outbox.now()))


# --- vouchers and statements -----------------------------------------------------------------------------------------

async def get_voucher(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "provider", "admin")
    voucher_id = param(request, "voucher_id", Uuid)
    return json_response(await commands.voucher(request.app[COMMANDS].pool, voucher_id, provider=_as_provider(who),
                                                now=outbox.now()))


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
    city = who.city if who.role == "auditor" else None  # a city-scoped auditor sees that city's lines only
    return json_response(await commands.statement(request.app[COMMANDS].pool, provider, start, end, city))



REDEMPTIONS_QUERY: Final = "redemption.redemptions"


async def list_redemptions(request: web.Request) -> web.Response:
    """Redemptions, oldest first, in pages, optionally of one voucher and within [from, to) by created_at: a provider
    sees its own, an auditor anyone's (a city-scoped auditor: that city's vouchers'), an admin anyone's."""
    who = principal(request)
    require(who, "provider", "auditor", "admin")
    voucher_id = param(request, "voucher_id", Uuid, query=True, default=None)
    start, end = paging.period(request)
    limit = paging.limit(request)
    provider = _as_provider(who)
    city = who.city if who.role == "auditor" else None
    pool = request.app[COMMANDS].pool
    filters = {"voucher_id": voucher_id, "from": start, "to": end, "provider": provider, "city": city}
    pos = await paging.position(request, pool, REDEMPTIONS_QUERY, filters)
    after = None if pos is None else tuple(paging.check_position(pos, Timestamp, Uuid))
    page = await queries.redemptions(pool, provider=provider, voucher_id=voucher_id, city=city, start=start, end=end,
                                     after=after, limit=limit)  # type: ignore[arg-type]
    last = None if page.last is None else [page.last[0].isoformat(), page.last[1]]
    return json_response(RedemptionPage(
        redemptions=page.redemptions, next_cursor=await paging.next_cursor(pool, REDEMPTIONS_QUERY, filters, last)))

ROUTES: Final = [
    Route("POST", "/v1/redemptions", redeem, "Redeem part of a voucher now, as the token's provider", ("provider",),
          RedemptionIn, Redemption, 201),
    Route("GET", "/v1/redemptions", list_redemptions,
          "Redemptions (captures included), oldest first, optionally of one voucher and with created_at in "
          "[from, to); a provider's own, or (auditor, admin) anyone's; pages by cursor",
          ("provider", "auditor", "admin"), None, RedemptionPage,
          params={"voucher_id": Uuid, **paging.PERIOD_PARAMS, **paging.PAGE_PARAMS}),
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

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[COMMANDS].pool, probe))

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        relay = outbox.Relay(settings, SCHEMA)

        writer = Redemptions(pool, topic=settings.topic_redemption, on_commit=relay.wake)
        svc = commands.Service(pool, settings.topic_redemption, relay.wake, submit=writer.submit)

        async def apply_issuing_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> None:
            await commands.apply_issuing_events(conn, delivered, topic=svc.topic, now=outbox.now(),
                                                wake_relay=relay.wake)

        consumer = Consumer(settings, pool, topics=[settings.topic_issuing], group=CONSUMER_GROUP,
                            handler=apply_issuing_events, wants=of_types(*commands.ISSUING_EVENTS_APPLIED))
        app[COMMANDS] = svc
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        consumer_task = asyncio.create_task(consumer.run(), name="issuing-consumer")
        background = [asyncio.create_task(idempotency.sweep_forever(pool), name="idempotency-sweeper"),
                      asyncio.create_task(processed_events.prune_forever(pool), name="processed-events-pruner"),
                      *sweeper.start(svc)]
        yield
        # Drain in dependency order (requests have finished): the writer commits what is queued, the sweepers stop
        # (a round in flight rolls back), the consumer commits its batch, the relay publishes what is committed,
        # then the pool closes.
        await writer.close()
        await tasks.cancel_all(background)
        await tasks.stop_within(consumer.stop, consumer_task, CONSUMER_DRAIN_S,
                                "issuing consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.stop_within(relay.stop, relay_task, RELAY_DRAIN_S,
                                "outbox relay did not drain in time; rows stay in the outbox for the next start")
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app
