"""Issuing service HTTP edge: routes, roles, and the wiring of pool, writers and relay.

Each handler parses, authorises, calls one command (`commands.py`) and responds.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

import asyncpg
from aiohttp import web

from schemas.common import DEFAULT_PROGRAM, Beneficiary, CityId, ProgramId, ProviderId, Timestamp, Uuid, Year
from schemas.issuing import (
    BatchMintIn, BatchMintOut, Budget, BudgetIn, City, CityIn, MintIn, Program, ProgramIn, Provider, ProviderIn,
    RevokeIn, TokenRevocation, TokenRevokeIn, Voucher, VoucherPage, VoucherStatus,
)

from services.common import db, http, idempotency, kafka, outbox, paging, processed_events, tasks
from services.common.auth import require
from services.common.consumer import Consumer, Delivered, of_types
from services.common.errors import ValidationFailed
from services.common.http import Route, json_response, param, principal
from services.common.settings import Settings
from schemas.limits import CONSUMER_DRAIN_S, RELAY_DRAIN_S

from . import commands, domain, queries, tokens
from .writer import Writers

SCHEMA: Final = "issuing"
MIGRATIONS: Final = Path(__file__).parent / "migrations"
POOL: Final = web.AppKey("pool", asyncpg.Pool)
COMMANDS: Final = web.AppKey("commands", commands.Issuing)
WRITERS: Final = web.AppKey("writers", Writers)
REVOCATIONS: Final = web.AppKey("revocations", tokens.Revocations)
CONSUMER_GROUP: Final = "issuing"  # reads the redemption topic: what revocations and expiries gave back


# --- cities, programs, budgets, providers ------------------------------------------------------------------------------------

async def put_city(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin")
    city = param(request, "city", CityId)
    body = http.decode(await http.read_body(request), CityIn)
    return http.answer(await commands.set_city(request.app[COMMANDS], who.subject, city, body))


async def put_program(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin")
    city = param(request, "city", CityId)
    program = param(request, "program", ProgramId)
    body = http.decode(await http.read_body(request), ProgramIn)
    return http.answer(await commands.set_program(request.app[COMMANDS], who.subject, city, program, body))


async def get_program(request: web.Request) -> web.Response:
    city = param(request, "city", CityId)
    require(principal(request), "admin", "issuer", "auditor", city=city)
    program = param(request, "program", ProgramId)
    return json_response(await commands.read_program(request.app[POOL], city, program))


async def _put_budget(request: web.Request, *, of_program: bool) -> web.Response:
    who = principal(request)
    require(who, "admin")
    city = param(request, "city", CityId)
    program = param(request, "program", ProgramId) if of_program else DEFAULT_PROGRAM
    year = param(request, "year", Year)
    body = http.decode(await http.read_body(request), BudgetIn)
    return http.answer(await commands.set_budget(request.app[COMMANDS], who.subject, city, year, body,
                                                 program=program))


async def _get_budget(request: web.Request, *, of_program: bool) -> web.Response:
    city = param(request, "city", CityId)
    require(principal(request), "admin", "issuer", "auditor", city=city)
    program = param(request, "program", ProgramId) if of_program else DEFAULT_PROGRAM
    year = param(request, "year", Year)
    return json_response(await commands.read_budget(request.app[POOL], city, year, program=program))


async def put_budget(request: web.Request) -> web.Response:
    """The first release's city budget: the program `default`'s."""
    return await _put_budget(request, of_program=False)


async def get_budget(request: web.Request) -> web.Response:
    return await _get_budget(request, of_program=False)


async def put_program_budget(request: web.Request) -> web.Response:
    return await _put_budget(request, of_program=True)


async def get_program_budget(request: web.Request) -> web.Response:
    return await _get_budget(request, of_program=True)


async def put_provider(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin")
    provider = param(request, "provider", ProviderId)
    body = http.decode(await http.read_body(request), ProviderIn)
    return http.answer(await commands.set_provider(request.app[COMMANDS], who.subject, provider, body))


# --- vouchers -----------------------------------------------------------------------------------------------------

def _mint(request: web.Request, vouchers: list[MintIn], raw: bytes, *,
          batch: bool) -> Coroutine[Any, Any, idempotency.Answer]:
    """Authorise a mint, then its command, as a coroutine the handler awaits (one frame fewer per request)."""
    who = principal(request)
    for city in dict.fromkeys(v.city for v in vouchers):  # each city once, in the order of first mention
        require(who, "issuer", city=city)
    key = http.idempotency_key(request, who, raw)
    return commands.mint(request.app[COMMANDS], request.app[WRITERS], who.subject, vouchers, key, batch=batch)


async def mint(request: web.Request) -> web.Response:
    raw = await http.read_body(request)
    return http.answer(await _mint(request, [http.decode(raw, MintIn)], raw, batch=False))


async def mint_batch(request: web.Request) -> web.Response:
    raw = await http.read_body(request)
    return http.answer(await _mint(request, http.decode(raw, BatchMintIn).vouchers, raw, batch=True))


async def get_voucher(request: web.Request) -> web.Response:
    who = principal(request)
    require(who, "admin", "issuer", city=who.city)
    voucher_id = param(request, "voucher_id", Uuid)
    voucher = await commands.read_voucher(request.app[POOL], voucher_id)
    require(who, "admin", "issuer", city=voucher.city)
    return json_response(voucher)


async def revoke(request: web.Request) -> web.Response:
    """The issuer revokes a voucher of its city (the saga: `commands.revoke`)."""
    who = principal(request)
    require(who, "issuer", city=who.city)
    voucher_id = param(request, "voucher_id", Uuid)
    raw = await http.read_body(request)
    body = http.decode(raw, RevokeIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await commands.revoke(request.app[COMMANDS], who, voucher_id, body, key))



VOUCHERS_QUERY: Final = "issuing.vouchers"


async def list_vouchers(request: web.Request) -> web.Response:
    """A city's vouchers, oldest first, in pages: the issuer of that city (`city` defaults to the token's), or an
    admin (who names the city)."""
    who = principal(request)
    require(who, "admin", "issuer", city=who.city)
    city = param(request, "city", CityId, query=True, default=who.city if who.role == "issuer" else None)
    if city is None:
        raise ValidationFailed("parameter city is required", field="city")
    require(who, "admin", "issuer", city=city)
    filters = {"city": city, "year": param(request, "year", Year, query=True, default=None),
               "beneficiary": param(request, "beneficiary", Beneficiary, query=True, default=None),
               "status": param(request, "status", VoucherStatus, query=True, default=None)}
    limit = paging.limit(request)
    pool = request.app[POOL]
    pos = await paging.position(request, pool, VOUCHERS_QUERY, filters)
    after = None if pos is None else tuple(paging.check_position(pos, Timestamp, Uuid))
    page = await queries.vouchers(pool, city, year=filters["year"], beneficiary=filters["beneficiary"],
                                  status=filters["status"], after=after, limit=limit)  # type: ignore[arg-type]
    last = None if page.last is None else [page.last[0].isoformat(), page.last[1]]
    return json_response(VoucherPage(vouchers=page.vouchers,
                                     next_cursor=await paging.next_cursor(pool, VOUCHERS_QUERY, filters, last)))


# --- bearer tokens ------------------------------------------------------------------------------------------------

async def revoke_token(request: web.Request) -> web.Response:
    """The admin revokes a bearer token before it expires; every service refuses it within seconds."""
    who = principal(request)
    require(who, "admin")
    raw = await http.read_body(request)
    body = http.decode(raw, TokenRevokeIn)
    key = http.idempotency_key(request, who, raw)
    return http.answer(await tokens.revoke(request.app[REVOCATIONS], who.subject, body, key))


ROUTES: Final = [
    Route("PUT", "/v1/cities/{city}", put_city, "Create or update a city", ("admin",), CityIn, City,
          params={"city": CityId}),
    Route("PUT", "/v1/cities/{city}/budgets/{year}", put_budget,
          "Set a city's annual budget (its program `default`)", ("admin",), BudgetIn,
          Budget, params={"city": CityId, "year": Year}),
    Route("GET", "/v1/cities/{city}/budgets/{year}", get_budget,
          "A budget with committed and available (the program `default`)",
          ("admin", "issuer", "auditor"), None, Budget, params={"city": CityId, "year": Year}),
    Route("PUT", "/v1/cities/{city}/programs/{program}", put_program,
          "Create or change a voucher program (scheme) of a city: its kind and who it is for", ("admin",),
          ProgramIn, Program, params={"city": CityId, "program": ProgramId}),
    Route("GET", "/v1/cities/{city}/programs/{program}", get_program, "A program of a city",
          ("admin", "issuer", "auditor"), None, Program, params={"city": CityId, "program": ProgramId}),
    Route("PUT", "/v1/cities/{city}/programs/{program}/budgets/{year}", put_program_budget,
          "Set a program's annual budget", ("admin",), BudgetIn, Budget,
          params={"city": CityId, "program": ProgramId, "year": Year}),
    Route("GET", "/v1/cities/{city}/programs/{program}/budgets/{year}", get_program_budget,
          "A program's budget with committed and available", ("admin", "issuer", "auditor"), None, Budget,
          params={"city": CityId, "program": ProgramId, "year": Year}),
    Route("PUT", "/v1/providers/{provider}", put_provider, "Whitelist a compute provider for cities", ("admin",),
          ProviderIn, Provider, params={"provider": ProviderId}),
    Route("POST", "/v1/vouchers", mint, "Mint a voucher within the budget", ("issuer",), MintIn, Voucher, 201),
    Route("POST", "/v1/vouchers/batch", mint_batch, "Mint up to 1000 vouchers, all or nothing", ("issuer",),
          BatchMintIn, BatchMintOut, 201),
    Route("GET", "/v1/vouchers", list_vouchers,
          "A city's vouchers, oldest first, optionally of one year, beneficiary or status; pages by cursor",
          ("admin", "issuer"), None, VoucherPage,
          params={"city": CityId, "year": Year, "beneficiary": Beneficiary, "status": VoucherStatus,
                  **paging.PAGE_PARAMS}),
    Route("GET", "/v1/vouchers/{voucher_id}", get_voucher, "A voucher", ("admin", "issuer"), None, Voucher,
          params={"voucher_id": Uuid}),
    Route("POST", "/v1/vouchers/{voucher_id}/revoke", revoke,
          "Revoke a voucher: it is frozen for redemption and its unspent balance returns to the budget",
          ("issuer",), RevokeIn, Voucher, params={"voucher_id": Uuid}),
    Route("POST", "/v1/tokens/revoke", revoke_token,
          "Revoke a bearer token by jti until its exp: every service refuses it within 5 s", ("admin",),
          TokenRevokeIn, TokenRevocation),
]


def create_app(settings: Settings) -> web.Application:
    probe = kafka.Probe(settings)

    app = http.base_app(settings, ROUTES, http.ready_check(lambda: app[POOL], probe))

    async def resources(app: web.Application):
        await kafka.ensure_topics(settings)
        pool = await db.create_pool(settings, SCHEMA)
        await db.migrate(pool, SCHEMA, MIGRATIONS)
        relay = outbox.Relay(settings, SCHEMA)
        writers = Writers(pool, topic=settings.topic_issuing, on_commit=relay.wake)

        async def apply_redemption_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> None:
            await commands.apply_redemption_events(conn, delivered, topic=settings.topic_issuing)

        consumer = Consumer(settings, pool, topics=[settings.topic_redemption], group=CONSUMER_GROUP,
                            handler=apply_redemption_events, wants=of_types(*domain.SETTLING_EVENTS))
        app[POOL], app[WRITERS] = pool, writers
        app[COMMANDS] = commands.Issuing(pool, settings.topic_issuing, relay.wake)
        app[REVOCATIONS] = tokens.Revocations(pool, settings.topic_tokens, relay.wake, app[http.VERIFIER].revoke)
        relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
        consumer_task = asyncio.create_task(consumer.run(), name="redemption-consumer")
        sweeper = asyncio.create_task(idempotency.sweep_forever(pool), name="idempotency-sweeper")
        pruner = asyncio.create_task(processed_events.prune_forever(pool), name="processed-events-pruner")
        yield
        # Drain in dependency order: writers commit what is queued, the consumer its batch, the relay publishes
        # what is committed, then the pool closes.
        await writers.close()
        await tasks.stop_within(consumer.stop, consumer_task, CONSUMER_DRAIN_S,
                                "redemption consumer did not stop in time; its uncommitted batch will be redelivered")
        await tasks.stop_within(relay.stop, relay_task, RELAY_DRAIN_S,
                                "outbox relay did not drain in time; rows stay in the outbox for the next start")
        await tasks.cancel_all([sweeper, pruner])
        await probe.close()
        await pool.close()

    app.cleanup_ctx.append(resources)
    return app

