"""A refused request leaves no garbage that only the cyclic collector frees.

A refusal kept after it was raised (on a batch's command, in a list of outcomes) holds its traceback, the traceback
holds the frames it passed, and a frame holds the command or the list that holds the refusal: a cycle, which
reference counting never frees. Under a load of refusals the whole batch each such frame held became cyclic garbage,
and the redemption process stopped for 25-50 ms every ~0.3 s to collect it (measured under `make bench`'s
redemptions, a third of them refused for spent vouchers). Refusals are kept without their traceback, and the edge
drops an answered exception's traceback. No stack needed: the edge runs in this process, on a loopback port.
"""
from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.common.errors import BudgetExceeded, Conflict, ServiceError
from services.common.http import edge_middleware
from services.issuing import domain
from services.issuing.domain import BudgetState

from tests.test_domain_issuing import voucher


@dataclass
class Command:  # as a writer's batch keeps one: its refusal on it, the handler raising it from there
    refusal: ServiceError | None = None


def check_spend() -> None:
    raise Conflict("the voucher is spent", field="voucher_id")


@contextlib.contextmanager
def no_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_a_refusal_raised_from_a_command_is_freed_by_reference_counting_alone():
    kept: list[weakref.ref] = []

    async def redeem(request: web.Request) -> web.Response:
        command = Command()
        try:
            check_spend()
        except ServiceError as refusal:
            command.refusal = refusal  # as kept, traceback and all (the edge must cope with any handler)
        kept.append(weakref.ref(command.refusal))
        raise command.refusal

    app = web.Application(middlewares=[edge_middleware("test", 5.0)])
    app.router.add_post("/v1/redemptions", redeem)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        with no_collector():
            for _ in range(3):
                async with http.post(server.make_url("/v1/redemptions"), json={}) as r:
                    body = await r.json()
                    assert (r.status, body["code"], body["field"]) == (409, "conflict", "voucher_id"), body
            # Answered and gone: nothing holds the refusals but a cycle, and there must be none.
            assert [ref() for ref in kept] == [None, None, None]


def test_decided_refusals_are_kept_without_their_traceback():
    budgets = {("hangzhou", "default", 2026): BudgetState(amount=1000, committed=0)}
    with no_collector():
        outcomes = domain.decide(budgets, {}, [[voucher(600)], [voucher(500)]])
        assert outcomes[0] is None and isinstance(outcomes[1], BudgetExceeded)
        # Its traceback would hold decide's frame, which holds `outcomes`: a cycle through the whole batch.
        assert outcomes[1].__traceback__ is None
