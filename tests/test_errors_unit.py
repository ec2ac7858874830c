"""The error middleware turns every failure into a problem+json, never a bare 500 page."""
from __future__ import annotations

import asyncpg
import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from services.common import http
from services.common.errors import BudgetExceeded


@pytest.mark.parametrize("exc, status, code", [
    (BudgetExceeded("too much", field="amount"), 409, "budget_exceeded"),
    (asyncpg.DeadlockDetectedError("deadlock detected"), 503, "unavailable"),
    (asyncpg.ConnectionDoesNotExistError("gone"), 503, "unavailable"),
    (ConnectionRefusedError("refused"), 503, "unavailable"),
    (KeyError("a bug"), 500, "internal_error"),
])
async def test_failures_become_problems(exc, status, code):
    async def handler(request):
        raise exc
    response = await http.errors_middleware(make_mocked_request("POST", "/v1/vouchers"), handler)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    body = msgspec.json.decode(response.body)
    assert (body["status"], body["code"]) == (status, code)
    assert {"type", "title", "detail"} <= body.keys()
