"""The error middleware turns every failure into a problem+json, never a bare 500 page."""
from __future__ import annotations

import asyncpg
import msgspec
import pytest

from services.common.errors import BudgetExceeded
from tests.harness import failed


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
    response = await failed(handler)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    body = msgspec.json.decode(response.body)
    assert (body["status"], body["code"]) == (status, code)
    assert {"type", "title", "detail"} <= body.keys()
