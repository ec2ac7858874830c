"""Issuing SQL: named, parameterised statements and the batched mint transaction."""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Final

import asyncpg

from schemas import events as ev
from schemas.issuing import Budget, City, MintIn, Provider, Voucher

from services.common import outbox
from services.common.errors import ServiceError
from services.common.http import IdempotencyKey

from .domain import BudgetKey, BudgetState, decide

UPSERT_CITY_SQL: Final = """
INSERT INTO cities AS c (city, name, currency) VALUES ($1, $2, $3)
ON CONFLICT (city) DO UPDATE SET name = EXCLUDED.name, currency = EXCLUDED.currency, updated_at = now()
    WHERE (c.name, c.currency) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.currency)
RETURNING city"""
GET_CITY_SQL: Final = "SELECT city, name, currency FROM cities WHERE city = $1"
LOCK_CITY_SQL: Final = "SELECT city FROM cities WHERE city = $1 FOR UPDATE"
INSERT_BUDGET_SQL: Final = """
INSERT INTO budgets (city, year, amount, enterprise_cap, year_end) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (city, year) DO NOTHING
RETURNING amount, committed"""
LOCK_BUDGET_SQL: Final = """
SELECT amount, committed, enterprise_cap, year_end FROM budgets WHERE city = $1 AND year = $2 FOR UPDATE"""
UPDATE_BUDGET_SQL: Final = """
UPDATE budgets SET amount = $3, enterprise_cap = $4, year_end = $5, updated_at = now()
WHERE city = $1 AND year = $2 AND committed <= $3
RETURNING amount, committed"""
GET_BUDGET_SQL: Final = """
SELECT city, year, amount, committed, enterprise_cap, year_end FROM budgets WHERE city = $1 AND year = $2"""
LIST_BUDGETS_SQL: Final = "SELECT city, year, amount, committed FROM budgets"
UPSERT_PROVIDER_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities) VALUES ($1, $2, $3)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, updated_at = now()
    WHERE (p.name, p.cities) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.cities)
RETURNING provider"""
GET_PROVIDER_SQL: Final = "SELECT provider, name, cities FROM providers WHERE provider = $1"
KNOWN_CITIES_SQL: Final = "SELECT city FROM cities WHERE city = ANY($1::text[])"
GET_VOUCHER_SQL: Final = """
SELECT voucher_id::text, city, year, beneficiary, kind, amount, subsidy_ratio_bp, providers, expires_at, status,
       created_at
FROM vouchers WHERE voucher_id = $1"""

# The mint transaction, in the order it runs.
CLAIM_KEYS_SQL: Final = """
INSERT INTO idempotency (principal, key, request_hash)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
ON CONFLICT DO NOTHING
RETURNING principal, key"""
LOCK_BUDGETS_SQL: Final = """
SELECT b.city, b.year, b.amount, b.committed
FROM budgets b JOIN unnest($1::text[], $2::int[]) AS k(city, year) USING (city, year)
ORDER BY b.city, b.year
FOR UPDATE OF b"""
# The final arbiter across replicas: a budget row is only ever raised within its amount.
COMMIT_BUDGETS_SQL: Final = """
UPDATE budgets b SET committed = b.committed + k.delta, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::bigint[]) AS k(city, year, delta)
WHERE b.city = k.city AND b.year = k.year AND b.committed + k.delta <= b.amount
RETURNING b.city, b.year, b.amount, b.committed"""
INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, subsidy_ratio_bp, providers, expires_at,
                      created_at)
SELECT v.id, v.city, v.year, v.beneficiary, v.kind, v.amount, v.ratio,
       CASE WHEN v.providers = '' THEN NULL ELSE string_to_array(v.providers, ',') END, v.expires_at, $10
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[], $8::text[],
            $9::timestamptz[]) AS v(id, city, year, beneficiary, kind, amount, ratio, providers, expires_at)"""
COMPLETE_KEYS_SQL: Final = """
UPDATE idempotency i SET status = k.status, body = k.body
FROM unnest($1::text[], $2::text[], $3::int[], $4::bytea[]) AS k(principal, key, status, body)
WHERE i.principal = k.principal AND i.key = k.key"""
RELEASE_KEYS_SQL: Final = """
DELETE FROM idempotency i USING unnest($1::text[], $2::text[]) AS k(principal, key)
WHERE i.principal = k.principal AND i.key = k.key"""


def budget_view(row: asyncpg.Record) -> Budget:
    return Budget(city=row["city"], year=row["year"], amount=row["amount"], committed=row["committed"],
                  available=row["amount"] - row["committed"], enterprise_cap=row["enterprise_cap"],
                  year_end=row["year_end"])


def voucher_view(row: asyncpg.Record) -> Voucher:
    return Voucher(voucher_id=row["voucher_id"], city=row["city"], year=row["year"],
                   beneficiary=row["beneficiary"], kind=row["kind"], amount=row["amount"],
                   subsidy_ratio_bp=row["subsidy_ratio_bp"], providers=row["providers"],
                   expires_at=row["expires_at"], status=row["status"], created_at=row["created_at"])


@dataclass
class MintCommand:
    """One mint request (a single voucher, or an all-or-nothing batch) waiting for its writer."""

    vouchers: list[MintIn]
    actor: str
    key: IdempotencyKey | None
    batch: bool  # answer with {"vouchers": [...]} rather than one voucher
    minted: list[Voucher] = field(default_factory=list)
    refusal: ServiceError | None = None
    replay: bool = False  # the key was already used: answer with the stored response


@dataclass
class MintOutcome:
    budgets: dict[BudgetKey, BudgetState]
    accepted: int
    refused: int


async def mint(conn: asyncpg.Connection, commands: list[MintCommand], *, producer: str, topic: str,
               encode) -> MintOutcome:
    """Decide and write a batch of mint commands in the caller's transaction (see DESIGN.md, "The hot account")."""
    assert conn.is_in_transaction()
    keyed = sorted((c for c in commands if c.key is not None), key=lambda c: (c.key.principal, c.key.key))
    if keyed:
        claimed = {(r["principal"], r["key"]) for r in await conn.fetch(
            CLAIM_KEYS_SQL, [c.key.principal for c in keyed], [c.key.key for c in keyed],
            [c.key.request_hash for c in keyed])}
        seen: set[tuple[str, str]] = set()
        for c in keyed:
            k = (c.key.principal, c.key.key)
            if k not in claimed or k in seen:  # used before, or twice in this batch
                c.replay = True
            seen.add(k)
    live = [c for c in commands if not c.replay]

    keys = sorted({(v.city, v.year) for c in live for v in c.vouchers})
    rows = await conn.fetch(LOCK_BUDGETS_SQL, [k[0] for k in keys], [k[1] for k in keys])
    budgets = {(r["city"], r["year"]): BudgetState(r["amount"], r["committed"]) for r in rows}
    before = {k: b.committed for k, b in budgets.items()}
    for c, refusal in zip(live, decide(budgets, [c.vouchers for c in live])):
        c.refusal = refusal

    deltas = {k: b.committed - before[k] for k, b in budgets.items() if b.committed != before[k]}
    if deltas:
        updated = await conn.fetch(COMMIT_BUDGETS_SQL, [k[0] for k in deltas], [k[1] for k in deltas],
                                   list(deltas.values()))
        assert len(updated) == len(deltas), "a budget row refused its update: committed would exceed amount"
        for r in updated:
            assert 0 <= r["committed"] <= r["amount"]
            assert budgets[(r["city"], r["year"])].committed == r["committed"]

    now = outbox.now()
    accepted = [c for c in live if c.refusal is None]
    ids, cities, years, beneficiaries, kinds, amounts, ratios, providers, expiries = ([] for _ in range(9))
    events = []
    for c in accepted:
        for v in c.vouchers:
            voucher_id = str(uuid.uuid4())
            c.minted.append(Voucher(
                voucher_id=voucher_id, city=v.city, year=v.year, beneficiary=v.beneficiary, kind=v.kind,
                amount=v.amount, subsidy_ratio_bp=v.subsidy_ratio_bp, providers=v.providers,
                expires_at=v.expires_at, status="active", created_at=now))
            ids.append(voucher_id)
            cities.append(v.city)
            years.append(v.year)
            beneficiaries.append(v.beneficiary)
            kinds.append(v.kind)
            amounts.append(v.amount)
            ratios.append(v.subsidy_ratio_bp)
            providers.append(",".join(v.providers) if v.providers else "")
            expiries.append(v.expires_at)
            data = ev.VoucherMintedData(
                voucher_id=voucher_id, city=v.city, year=v.year, beneficiary=v.beneficiary, kind=v.kind,
                amount=v.amount, subsidy_ratio_bp=v.subsidy_ratio_bp, providers=v.providers,
                expires_at=v.expires_at, created_at=now)
            events.append((topic, voucher_id,
                           outbox.envelope(ev.VoucherMinted, data, producer=producer, actor=c.actor, occurred_at=now)))
    if ids:
        await conn.execute(INSERT_VOUCHERS_SQL, ids, cities, years, beneficiaries, kinds, amounts, ratios, providers,
                           expiries, now)
        await outbox.append(conn, events)

    done = [c for c in accepted if c.key is not None]
    if done:
        await conn.execute(COMPLETE_KEYS_SQL, [c.key.principal for c in done], [c.key.key for c in done],
                           [201] * len(done), [encode(c) for c in done])
    # Refusals change nothing, the key included: release it so that a retry runs again.
    released = [c for c in live if c.refusal is not None and c.key is not None]
    if released:
        await conn.execute(RELEASE_KEYS_SQL, [c.key.principal for c in released], [c.key.key for c in released])
    return MintOutcome(budgets, len(accepted), len(live) - len(accepted))
