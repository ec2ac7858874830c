"""Fixtures: one real stack (PostgreSQL, Kafka, three service processes) per test session."""
from __future__ import annotations

import datetime as dt

import aiohttp
import pytest

from services.stack import Stack, create_stack, drop_stack, unique
from tests.harness import Api, eventually


@pytest.fixture(scope="session")
async def stack():
    s = await create_stack()
    try:
        yield s
    finally:
        await drop_stack(s)


@pytest.fixture(scope="session")
async def api():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as session:
        yield Api(session)


def expires(days: int = 180) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).isoformat()


class World:
    """A fresh city with a budget and whitelisted providers, and tokens for everyone in it."""

    def __init__(self, stack: Stack, api: Api, city: str, year: int, providers: list[str]):
        self.stack, self.api, self.city, self.year, self.providers = stack, api, city, year, providers
        self.admin = stack.token("admin")
        self.issuer = stack.token("issuer", city=city)
        self.auditor = stack.token("auditor")
        self.provider_tokens = {p: stack.token("provider", provider=p) for p in providers}
        self.issuing = stack.url("issuing")
        self.redemption = stack.url("redemption")
        self.ledger = stack.url("ledger")

    def mint_body(self, amount: int, **extra) -> dict:
        return {"city": self.city, "year": self.year, "beneficiary": "91330100MA2XXXXX01", "amount": amount,
                "expires_at": expires(), **extra}

    async def mint(self, amount: int, **extra):
        return await self.api.call("POST", f"{self.issuing}/v1/vouchers", token=self.issuer,
                                   json=self.mint_body(amount, **extra))

    async def budget(self) -> dict:
        r = await self.api.call("GET", f"{self.issuing}/v1/cities/{self.city}/budgets/{self.year}", token=self.admin)
        assert r.status == 200, r.body
        return r.body

    async def redeemable(self, voucher_id: str, provider: str | None = None) -> dict:
        """Wait until the redemption service has consumed the voucher's mint."""
        provider = provider or self.providers[0]

        async def check():
            r = await self.api.call("GET", f"{self.redemption}/v1/vouchers/{voucher_id}",
                                    token=self.provider_tokens[provider])
            return r.body if r.status == 200 else None
        return await eventually(check)

    async def redeem(self, voucher_id: str, amount: int, provider: str | None = None, **extra):
        provider = provider or self.providers[0]
        return await self.api.call("POST", f"{self.redemption}/v1/redemptions", token=self.provider_tokens[provider],
                                   json={"voucher_id": voucher_id, "amount": amount, **extra})


async def make_world(stack: Stack, api: Api, budget: int, *, year: int = 2026, providers: int = 2,
                     **budget_extra) -> World:
    city = unique("city")
    names = [unique("prov") for _ in range(providers)]
    w = World(stack, api, city, year, names)
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{city}", token=w.admin, json={"name": city, "currency": "CNY"})
    assert r.status == 200, r.body
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{city}/budgets/{year}", token=w.admin,
                       json={"amount": budget, **budget_extra})
    assert r.status == 200, r.body
    for p in names:
        r = await api.call("PUT", f"{w.issuing}/v1/providers/{p}", token=w.admin, json={"name": p, "cities": [city]})
        assert r.status == 200, r.body
    return w


@pytest.fixture
async def world_factory(stack, api):
    async def factory(budget: int, **kw) -> World:
        return await make_world(stack, api, budget, **kw)
    return factory
