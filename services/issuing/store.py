"""Issuing SQL: named, parameterised statements and the batched mint transaction."""
from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import asyncpg

from schemas import events as ev
from schemas.issuing import Budget, MintIn, Voucher

from services.common import idempotency, outbox
from services.common.consumer import Delivered
from services.common.errors import ServiceError

from .domain import BudgetKey, BudgetState, Settlement, UsageKey, decide, settle_expired, settle_frozen, usage_needs

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
_VOUCHER_COLUMNS: Final = """
voucher_id::text, city, year, beneficiary, kind, amount, subsidy_ratio_bp, providers, expires_at, status,
created_at, returned, lapsed, revoked_reason, revoked_at, frozen"""
GET_VOUCHER_SQL: Final = f"SELECT {_VOUCHER_COLUMNS} FROM vouchers WHERE voucher_id = $1"

# --- revocation: the issuer's intent; the redemption service freezes the voucher and says what came back ----------
LOCK_VOUCHER_SQL: Final = f"SELECT {_VOUCHER_COLUMNS} FROM vouchers WHERE voucher_id = $1 FOR UPDATE"
REVOKE_VOUCHER_SQL: Final = f"""
UPDATE vouchers SET status = 'revoked', revoked_reason = $2, revoked_at = $3
WHERE voucher_id = $1 AND status = 'active'
RETURNING {_VOUCHER_COLUMNS}"""

# --- value coming back from the redemption side (VoucherFrozen, VoucherExpired), in lock order --------------------
# budgets (sorted) → enterprise_usage (sorted) → vouchers (sorted), as in the mint batch, so that the consumer and the
# writers never wait on each other in a cycle.
HOMES_SQL: Final = """
SELECT voucher_id::text, city, year, beneficiary FROM vouchers WHERE voucher_id = ANY($1::uuid[])"""
LOCK_VOUCHERS_SQL: Final = """
SELECT voucher_id::text, status, amount, returned, lapsed FROM vouchers WHERE voucher_id = ANY($1::uuid[])
ORDER BY voucher_id FOR UPDATE"""
# The final arbiter: committed (and an enterprise's usage) only ever go down by what is there.
RETURN_TO_BUDGETS_SQL: Final = """
UPDATE budgets b SET committed = b.committed - k.returned, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::bigint[]) AS k(city, year, returned)
WHERE b.city = k.city AND b.year = k.year AND b.committed >= k.returned
RETURNING b.city, b.year, b.amount, b.committed"""
RETURN_TO_USAGE_SQL: Final = """
UPDATE enterprise_usage u SET used = u.used - k.returned
FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[]) AS k(city, year, beneficiary, returned)
WHERE u.city = k.city AND u.year = k.year AND u.beneficiary = k.beneficiary AND u.used >= k.returned
RETURNING u.city, u.year, u.beneficiary, u.used"""
SETTLE_VOUCHERS_SQL: Final = """
UPDATE vouchers v SET returned = v.returned + k.returned, lapsed = v.lapsed + k.lapsed,
                      frozen = v.frozen OR k.frozen,
                      status = CASE WHEN k.expired AND v.status = 'active' THEN 'expired' ELSE v.status END
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bool[], $5::bool[])
     AS k(voucher_id, returned, lapsed, frozen, expired)
WHERE v.voucher_id = k.voucher_id
RETURNING v.voucher_id::text, v.amount, v.returned, v.lapsed"""

# The mint transaction, in the order it runs.
LOCK_BUDGETS_SQL: Final = """
SELECT b.city, b.year, b.amount, b.committed, b.enterprise_cap, b.year_end
FROM budgets b JOIN unnest($1::text[], $2::int[]) AS k(city, year) USING (city, year)
ORDER BY b.city, b.year
FOR UPDATE OF b"""
# The final arbiter across replicas: a budget row is only ever raised within its amount.
COMMIT_BUDGETS_SQL: Final = """
UPDATE budgets b SET committed = b.committed + k.delta, updated_at = now()
FROM unnest($1::text[], $2::int[], $3::bigint[]) AS k(city, year, delta)
WHERE b.city = k.city AND b.year = k.year AND b.committed + k.delta <= b.amount
RETURNING b.city, b.year, b.amount, b.committed"""
# Usage rows are written only under their budget row's lock (taken just before): the FOR UPDATE is belt and braces.
LOCK_USAGE_SQL: Final = """
SELECT u.city, u.year, u.beneficiary, u.used
FROM enterprise_usage u JOIN unnest($1::text[], $2::int[], $3::text[]) AS k(city, year, beneficiary)
     USING (city, year, beneficiary)
ORDER BY u.city, u.year, u.beneficiary
FOR UPDATE OF u"""
# The final arbiter for caps: a row is only raised within the cap its budget had when the batch locked it.
RAISE_USAGE_SQL: Final = """
UPDATE enterprise_usage u SET used = u.used + k.delta
FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::bigint[]) AS k(city, year, beneficiary, delta, cap)
WHERE u.city = k.city AND u.year = k.year AND u.beneficiary = k.beneficiary
  AND (k.cap IS NULL OR u.used + k.delta <= k.cap)
RETURNING u.city, u.year, u.beneficiary, u.used"""
INSERT_USAGE_SQL: Final = """
INSERT INTO enterprise_usage (city, year, beneficiary, used)
SELECT k.city, k.year, k.beneficiary, k.delta
FROM unnest($1::text[], $2::int[], $3::text[], $4::bigint[], $5::bigint[]) AS k(city, year, beneficiary, delta, cap)
WHERE k.cap IS NULL OR k.delta <= k.cap
ORDER BY k.city, k.year, k.beneficiary
RETURNING city, year, beneficiary, used"""
INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, subsidy_ratio_bp, providers, expires_at,
                      created_at)
SELECT v.id, v.city, v.year, v.beneficiary, v.kind, v.amount, v.ratio,
       CASE WHEN v.providers = '' THEN NULL ELSE string_to_array(v.providers, ',') END, v.expires_at, $10
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[], $8::text[],
            $9::timestamptz[]) AS v(id, city, year, beneficiary, kind, amount, ratio, providers, expires_at)"""


def budget_view(row: asyncpg.Record) -> Budget:
    return Budget(city=row["city"], year=row["year"], amount=row["amount"], committed=row["committed"],
                  available=row["amount"] - row["committed"], enterprise_cap=row["enterprise_cap"],
                  year_end=row["year_end"])


def voucher_view(row: asyncpg.Record) -> Voucher:
    assert row["returned"] + row["lapsed"] <= row["amount"]
    return Voucher(voucher_id=row["voucher_id"], city=row["city"], year=row["year"],
                   beneficiary=row["beneficiary"], kind=row["kind"], amount=row["amount"],
                   subsidy_ratio_bp=row["subsidy_ratio_bp"], providers=row["providers"],
                   expires_at=row["expires_at"], status=row["status"], created_at=row["created_at"],
                   returned=row["returned"], lapsed=row["lapsed"], revoked_reason=row["revoked_reason"],
                   revocation_pending=row["revoked_at"] is not None and not row["frozen"])


@dataclass
class MintCommand:
    """One mint request (a single voucher, or an all-or-nothing batch) waiting for its writer."""

    vouchers: list[MintIn]
    actor: str
    key: idempotency.Key | None
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
        claimed = await idempotency.claim_many(conn, [c.key for c in keyed])
        seen: set[tuple[str, str]] = set()
        for c in keyed:
            k = (c.key.principal, c.key.key)
            if k not in claimed or k in seen:  # used before, or twice in this batch
                c.replay = True
            seen.add(k)
    live = [c for c in commands if not c.replay]

    keys = sorted({(v.city, v.year) for c in live for v in c.vouchers})
    rows = await conn.fetch(LOCK_BUDGETS_SQL, [k[0] for k in keys], [k[1] for k in keys])
    budgets = {(r["city"], r["year"]): BudgetState(r["amount"], r["committed"], r["enterprise_cap"], r["year_end"])
               for r in rows}
    before = {k: b.committed for k, b in budgets.items()}
    # Enterprise usage of the budgets that exist (a command on a missing budget is refused before its cap counts).
    ukeys = sorted({k for c in live for k in usage_needs(c.vouchers) if k[:2] in budgets})
    usage: dict[UsageKey, int] = {}
    if ukeys:
        usage = {(r["city"], r["year"], r["beneficiary"]): r["used"] for r in await conn.fetch(
            LOCK_USAGE_SQL, [k[0] for k in ukeys], [k[1] for k in ukeys], [k[2] for k in ukeys])}
    usage_before = dict(usage)
    for c, refusal in zip(live, decide(budgets, usage, [c.vouchers for c in live])):
        c.refusal = refusal

    deltas = {k: b.committed - before[k] for k, b in budgets.items() if b.committed != before[k]}
    if deltas:
        updated = await conn.fetch(COMMIT_BUDGETS_SQL, [k[0] for k in deltas], [k[1] for k in deltas],
                                   list(deltas.values()))
        assert len(updated) == len(deltas), "a budget row refused its update: committed would exceed amount"
        for r in updated:
            assert 0 <= r["committed"] <= r["amount"]
            assert budgets[(r["city"], r["year"])].committed == r["committed"]
    await _raise_usage(conn, budgets, usage, usage_before)

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
                expires_at=v.expires_at, created_at=now, year_end=budgets[(v.city, v.year)].year_end)
            events.append((topic, voucher_id,
                           outbox.envelope(ev.VoucherMinted, data, producer=producer, actor=c.actor, occurred_at=now)))
    if ids:
        await conn.execute(INSERT_VOUCHERS_SQL, ids, cities, years, beneficiaries, kinds, amounts, ratios, providers,
                           expiries, now)
        await outbox.append(conn, events)

    done = [c for c in accepted if c.key is not None]
    if done:
        await idempotency.complete_many(conn, [(c.key, 201, encode(c)) for c in done])
    # Refusals change nothing, the key included: release it so that a retry runs again.
    released = [c for c in live if c.refusal is not None and c.key is not None]
    if released:
        await idempotency.release_many(conn, [c.key for c in released])
    return MintOutcome(budgets, len(accepted), len(live) - len(accepted))


async def _raise_usage(conn: asyncpg.Connection, budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
                       before: dict[UsageKey, int]) -> None:
    """Write the batch's enterprise usage: existing rows raised, new rows inserted, each within its cap."""
    changed = sorted(k for k, used in usage.items() if used != before.get(k, 0))
    if not changed:
        return
    for new_rows, sql in ((False, RAISE_USAGE_SQL), (True, INSERT_USAGE_SQL)):
        ks = [k for k in changed if (k not in before) == new_rows]
        if not ks:
            continue
        written = await conn.fetch(sql, [k[0] for k in ks], [k[1] for k in ks], [k[2] for k in ks],
                                   [usage[k] - before.get(k, 0) for k in ks],
                                   [budgets[k[:2]].enterprise_cap for k in ks])
        assert len(written) == len(ks), "an enterprise usage row refused its update: the cap would be exceeded"
        for r in written:
            assert r["used"] == usage[(r["city"], r["year"], r["beneficiary"])]


class SettledBatch(NamedTuple):
    budgets: dict[BudgetKey, tuple[int, int]]   # (amount, committed) after the batch
    returned: int
    lapsed: int
    unknown: list[str]                          # voucher ids this service never minted (logged by the caller)


async def apply_redemption_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> SettledBatch:
    """Consumer handler (the batch's transaction, fresh events only): the redemption side's end of a voucher.

    VoucherFrozen (a revocation took effect, or a refund on a frozen voucher): `returned` goes back to the budget
    and to the enterprise's cap. VoucherExpired: with "carry" the same; with "lapse" the value stays committed (it
    lapsed, it is not available again). Every other redemption event needs nothing here. Each event applies exactly
    once (the consumer's processed_events), so the amounts simply add up.
    """
    assert conn.is_in_transaction()
    settlements: dict[str, Settlement] = {}
    for d in delivered:
        match d.event:
            case ev.VoucherFrozen(data=data):
                settle_frozen(settlements.setdefault(data.voucher_id, Settlement()), data.returned)
            case ev.VoucherExpired(data=data):
                settle_expired(settlements.setdefault(data.voucher_id, Settlement()), data.amount, data.disposition)
            case _:
                pass
    if not settlements:
        return SettledBatch({}, 0, 0, [])
    homes = {r["voucher_id"]: r for r in await conn.fetch(HOMES_SQL, sorted(settlements))}
    unknown = sorted(set(settlements) - homes.keys())
    ids = sorted(homes)
    to_budget: dict[BudgetKey, int] = defaultdict(int)
    to_usage: dict[UsageKey, int] = defaultdict(int)
    for vid in ids:
        h, s = homes[vid], settlements[vid]
        to_budget[(h["city"], h["year"])] += s.returned
        to_usage[(h["city"], h["year"], h["beneficiary"])] += s.returned

    # Lock order of the mint batch: budgets, enterprise usage, then the vouchers.
    bkeys = sorted(to_budget)
    await conn.fetch(LOCK_BUDGETS_SQL, [k[0] for k in bkeys], [k[1] for k in bkeys])
    ukeys = sorted(to_usage)
    await conn.fetch(LOCK_USAGE_SQL, [k[0] for k in ukeys], [k[1] for k in ukeys], [k[2] for k in ukeys])
    await conn.fetch(LOCK_VOUCHERS_SQL, ids)

    budgets: dict[BudgetKey, tuple[int, int]] = {}
    bkeys = [k for k in bkeys if to_budget[k]]
    if bkeys:
        updated = await conn.fetch(RETURN_TO_BUDGETS_SQL, [k[0] for k in bkeys], [k[1] for k in bkeys],
                                   [to_budget[k] for k in bkeys])
        assert len(updated) == len(bkeys), "more came back than a budget had committed"
        budgets = {(r["city"], r["year"]): (r["amount"], r["committed"]) for r in updated}
    ukeys = [k for k in ukeys if to_usage[k]]
    if ukeys:
        updated = await conn.fetch(RETURN_TO_USAGE_SQL, [k[0] for k in ukeys], [k[1] for k in ukeys],
                                   [k[2] for k in ukeys], [to_usage[k] for k in ukeys])
        assert len(updated) == len(ukeys), "more came back than an enterprise had used"
    settled = await conn.fetch(SETTLE_VOUCHERS_SQL, ids, [settlements[i].returned for i in ids],
                               [settlements[i].lapsed for i in ids], [settlements[i].frozen for i in ids],
                               [settlements[i].expired for i in ids])
    assert len(settled) == len(ids)
    for r in settled:
        assert r["returned"] + r["lapsed"] <= r["amount"], f"voucher {r['voucher_id']}: more came back than it held"
    return SettledBatch(budgets, sum(settlements[i].returned for i in ids), sum(settlements[i].lapsed for i in ids),
                        unknown)
