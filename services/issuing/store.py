"""Issuing SQL: named, parameterised statements, and rows mapped to the service's types (the commands run them)."""
from __future__ import annotations

from typing import Final

import asyncpg
import msgspec

from schemas import events as ev
from schemas.common import DEFAULT_PROGRAM
from schemas.issuing import Budget, Program, Voucher
from services.common import outbox

from .domain import BudgetKey, BudgetState, ProgramState

UPSERT_CITY_SQL: Final = """
INSERT INTO cities AS c (city, name, currency) VALUES ($1, $2, $3)
ON CONFLICT (city) DO UPDATE SET name = EXCLUDED.name, currency = EXCLUDED.currency, updated_at = now()
    WHERE (c.name, c.currency) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.currency)
RETURNING city"""
LOCK_CITY_SQL: Final = "SELECT city FROM cities WHERE city = $1 FOR UPDATE"
# A city is created with its program `default` (kind compute): the first release's city budget is that program's.
INSERT_DEFAULT_PROGRAM_SQL: Final = f"""
INSERT INTO programs (city, program, name, kind) VALUES ($1, '{DEFAULT_PROGRAM}', '{DEFAULT_PROGRAM}', 'compute')
ON CONFLICT (city, program) DO NOTHING"""

# --- programs: written under the city row's lock (ProgramSet is city-keyed) --------------------------------------
GET_PROGRAM_SQL: Final = """
SELECT city, program, name, kind, eligible FROM programs WHERE city = $1 AND program = $2"""
UPSERT_PROGRAM_SQL: Final = """
INSERT INTO programs AS p (city, program, name, kind, eligible) VALUES ($1, $2, $3, $4, $5::jsonb)
ON CONFLICT (city, program) DO UPDATE
    SET name = EXCLUDED.name, kind = EXCLUDED.kind, eligible = EXCLUDED.eligible, updated_at = now()
RETURNING city, program, name, kind, eligible"""
# A kind change waits for the mints in flight on the program's budgets (they decide a voucher's kind under these
# locks), then asks whether any voucher was minted under the program.
LOCK_PROGRAM_BUDGETS_SQL: Final = """
SELECT year FROM budgets WHERE city = $1 AND program = $2 ORDER BY year FOR UPDATE"""
# budgets.minted: the vouchers minted under the budget (migration 008), raised by WRITE_MINTS_SQL.
PROGRAM_MINTED_SQL: Final = "SELECT EXISTS (SELECT 1 FROM budgets WHERE city = $1 AND program = $2 AND minted > 0)"

# --- budgets: set under the city row's lock (BudgetSet is city-keyed) --------------------------------------------
# `seq` is the budget's step count (migration 005): every statement below that changes amount or committed raises it
# by the steps its transaction's events carry, and checks it was what the events were numbered from.
# A new budget's BudgetSet is its step 1.
INSERT_BUDGET_SQL: Final = """
INSERT INTO budgets (city, program, year, amount, enterprise_cap, year_end, seq) VALUES ($1, $2, $3, $4, $5, $6, 1)
ON CONFLICT (city, program, year) DO NOTHING
RETURNING amount, committed, seq"""
LOCK_BUDGET_SQL: Final = """
SELECT amount, committed, enterprise_cap, year_end, seq FROM budgets WHERE city = $1 AND program = $2 AND year = $3
FOR UPDATE"""
UPDATE_BUDGET_SQL: Final = """
UPDATE budgets SET amount = $4, enterprise_cap = $5, year_end = $6, seq = seq + 1, updated_at = now()
WHERE city = $1 AND program = $2 AND year = $3 AND committed <= $4
RETURNING amount, committed, seq"""
GET_BUDGET_SQL: Final = """
SELECT city, program, year, amount, committed, enterprise_cap, year_end FROM budgets
WHERE city = $1 AND program = $2 AND year = $3"""
UPSERT_PROVIDER_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities) VALUES ($1, $2, $3)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, updated_at = now()
    WHERE (p.name, p.cities) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.cities)
RETURNING provider"""
KNOWN_CITIES_SQL: Final = "SELECT city FROM cities WHERE city = ANY($1::text[])"
_VOUCHER_COLUMNS: Final = """
voucher_id::text, city, program, year, beneficiary, kind, amount, subsidy_ratio_bp, providers, expires_at, status,
created_at, returned, lapsed, carried, revoked_reason, revoked_at, frozen"""
GET_VOUCHER_SQL: Final = f"SELECT {_VOUCHER_COLUMNS} FROM vouchers WHERE voucher_id = $1"

# --- revocation: the issuer's intent; the redemption service freezes the voucher and says what came back ----------
LOCK_VOUCHER_SQL: Final = f"SELECT {_VOUCHER_COLUMNS} FROM vouchers WHERE voucher_id = $1 FOR UPDATE"
REVOKE_VOUCHER_SQL: Final = f"""
UPDATE vouchers SET status = 'revoked', revoked_reason = $2, revoked_at = $3
WHERE voucher_id = $1 AND status = 'active'
RETURNING {_VOUCHER_COLUMNS}"""

# --- value coming back from the redemption side (VoucherFrozen, VoucherExpired), in lock order --------------------
# cities (sorted, only when carrying) → budgets (sorted) → enterprise_usage (sorted) → vouchers (sorted), as in
# set_budget and the mint batch, so that the consumer, the writers and the admin never wait on each other in a cycle.
HOMES_SQL: Final = """
SELECT voucher_id::text, city, program, year, beneficiary FROM vouchers WHERE voucher_id = ANY($1::uuid[])"""
LOCK_CITIES_SQL: Final = "SELECT city FROM cities WHERE city = ANY($1::text[]) ORDER BY city FOR UPDATE"
GET_BUDGETS_SQL: Final = """
SELECT b.city, b.program, b.year, b.amount, b.committed, b.enterprise_cap, b.year_end, b.seq
FROM budgets b JOIN unnest($1::text[], $2::text[], $3::int[]) AS k(city, program, year) USING (city, program, year)"""
# A carry into a year that has no budget yet creates it (under the city row's lock, like set_budget).
INSERT_BUDGETS_SQL: Final = """
INSERT INTO budgets (city, program, year, amount, enterprise_cap, year_end)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::bigint[], $6::text[])
ORDER BY 1, 2, 3
ON CONFLICT (city, program, year) DO NOTHING
RETURNING city, program, year"""
LOCK_VOUCHERS_SQL: Final = """
SELECT voucher_id::text, status, amount, returned, lapsed, carried FROM vouchers WHERE voucher_id = ANY($1::uuid[])
ORDER BY voucher_id FOR UPDATE"""
# The final arbiter: committed (and an enterprise's usage) only ever go down by what is there. seq rises by the
# returns' steps (one BudgetReturned per voucher), numbered from the seq locked ($6).
RETURN_TO_BUDGETS_SQL: Final = """
UPDATE budgets b SET committed = b.committed - k.returned, seq = b.seq + k.steps, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::int[], $6::bigint[])
     AS k(city, program, year, returned, steps, seq)
WHERE b.city = k.city AND b.program = k.program AND b.year = k.year AND b.committed >= k.returned AND b.seq = k.seq
RETURNING b.city, b.program, b.year, b.amount, b.committed, b.seq"""
# Year-end carry: the next year's budget's amount rises; its committed does not change. seq as above (one
# BudgetCarried per voucher).
CARRY_INTO_BUDGETS_SQL: Final = """
UPDATE budgets b SET amount = b.amount + k.carried, seq = b.seq + k.steps, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::int[], $6::bigint[])
     AS k(city, program, year, carried, steps, seq)
WHERE b.city = k.city AND b.program = k.program AND b.year = k.year AND b.seq = k.seq
RETURNING b.city, b.program, b.year, b.amount, b.committed, b.seq"""
RETURN_TO_USAGE_SQL: Final = """
UPDATE enterprise_usage u SET used = u.used - k.returned
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::bigint[]) AS k(city, program, year, beneficiary, returned)
WHERE u.city = k.city AND u.program = k.program AND u.year = k.year AND u.beneficiary = k.beneficiary
  AND u.used >= k.returned
RETURNING u.city, u.program, u.year, u.beneficiary, u.used"""
SETTLE_VOUCHERS_SQL: Final = """
UPDATE vouchers v SET returned = v.returned + k.returned, lapsed = v.lapsed + k.lapsed,
                      carried = v.carried + k.carried, frozen = v.frozen OR k.frozen,
                      status = CASE WHEN k.expired AND v.status = 'active' THEN 'expired' ELSE v.status END
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bool[], $6::bool[])
     AS k(voucher_id, returned, lapsed, carried, frozen, expired)
WHERE v.voucher_id = k.voucher_id
RETURNING v.voucher_id::text, v.amount, v.returned, v.lapsed, v.carried"""

# The mint transaction, in the order it runs.
# Budgets are keyed (city, program, year) and locked in that order.
LOCK_BUDGETS_SQL: Final = """
SELECT b.city, b.program, b.year, b.amount, b.committed, b.enterprise_cap, b.year_end, b.seq, b.minted
FROM budgets b JOIN unnest($1::text[], $2::text[], $3::int[]) AS k(city, program, year) USING (city, program, year)
ORDER BY b.city, b.program, b.year
FOR UPDATE OF b"""
# Read under the budget locks, not locked: a kind change takes the program's budget locks (LOCK_PROGRAM_BUDGETS_SQL)
# before it asks whether the program minted, so no mint decides on a kind that is being changed.
GET_PROGRAMS_SQL: Final = """
SELECT p.city, p.program, p.name, p.kind, p.eligible
FROM programs p JOIN unnest($1::text[], $2::text[]) AS k(city, program) USING (city, program)"""
# Usage rows are written only under their budget row's lock (taken just before): the FOR UPDATE is belt and braces.
LOCK_USAGE_SQL: Final = """
SELECT u.city, u.program, u.year, u.beneficiary, u.used
FROM enterprise_usage u JOIN unnest($1::text[], $2::text[], $3::int[], $4::text[]) AS k(city, program, year, beneficiary)
     USING (city, program, year, beneficiary)
ORDER BY u.city, u.program, u.year, u.beneficiary
FOR UPDATE OF u"""
# The final arbiter for caps: a row is only raised within the cap its budget had when the batch locked it.
RAISE_USAGE_SQL: Final = """
UPDATE enterprise_usage u SET used = u.used + k.delta
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::bigint[], $6::bigint[])
     AS k(city, program, year, beneficiary, delta, cap)
WHERE u.city = k.city AND u.program = k.program AND u.year = k.year AND u.beneficiary = k.beneficiary
  AND (k.cap IS NULL OR u.used + k.delta <= k.cap)
RETURNING u.city, u.program, u.year, u.beneficiary, u.used"""
INSERT_USAGE_SQL: Final = """
INSERT INTO enterprise_usage (city, program, year, beneficiary, used)
SELECT k.city, k.program, k.year, k.beneficiary, k.delta
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::bigint[], $6::bigint[])
     AS k(city, program, year, beneficiary, delta, cap)
WHERE k.cap IS NULL OR k.delta <= k.cap
ORDER BY k.city, k.program, k.year, k.beneficiary
RETURNING city, program, year, beneficiary, used"""
# The batch's writes in ONE statement (one round trip): the budgets raised (the final arbiter across replicas: a budget
# row is only ever raised within its amount), the usage of budgets without a cap added to (rows created as needed; a
# capped budget's usage is written by RAISE_USAGE_SQL / INSERT_USAGE_SQL, within the cap), the vouchers inserted, and
# their events queued in the outbox (layout: services.common.outbox; $21: topic, then per event $22: key, $23: event id,
# $24: type, $25: payload, in order: a VoucherMinted keyed by its voucher id per single mint, a VouchersMinted keyed by
# city per budget of a batch request). A budget's seq rises by its steps ($26: one per VoucherMinted, one per
# VouchersMinted), which the events were numbered with from the seq locked ($27), and its minted count by its vouchers
# ($28). Migration 008's statement trigger checks the inserted vouchers' budgets once (no per-row foreign key).
# Every row it touches is under the budget row locks the batch holds, so the order in which PostgreSQL runs the parts
# does not matter; a budget that refuses its update fails the batch, which then rolls back whole.
WRITE_MINTS_SQL: Final = f"""
WITH usage AS (
    INSERT INTO enterprise_usage AS u (city, program, year, beneficiary, used)
    SELECT * FROM unnest($5::text[], $6::text[], $7::int[], $8::text[], $9::bigint[])
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (city, program, year, beneficiary) DO UPDATE SET used = u.used + EXCLUDED.used
    RETURNING 1
), minted AS (
    INSERT INTO vouchers (voucher_id, city, program, year, beneficiary, kind, amount, subsidy_ratio_bp, providers,
                          expires_at, created_at)
    SELECT v.id, v.city, v.program, v.year, v.beneficiary, v.kind, v.amount, v.ratio,
           CASE WHEN v.providers = '' THEN NULL ELSE string_to_array(v.providers, ',') END, v.expires_at, $20
    FROM unnest($10::uuid[], $11::text[], $12::text[], $13::int[], $14::text[], $15::text[], $16::bigint[], $17::int[],
                $18::text[], $19::timestamptz[])
         AS v(id, city, program, year, beneficiary, kind, amount, ratio, providers, expires_at)
), queued AS (
    INSERT INTO outbox ({outbox.COLUMNS})
    SELECT $21::text, e.key, e.event_id, e.type, e.payload
    FROM unnest($22::text[], $23::uuid[], $24::text[], $25::bytea[]) WITH ORDINALITY AS e(key, event_id, type, payload, n)
    ORDER BY e.n
)
UPDATE budgets b SET committed = b.committed + k.delta, seq = b.seq + k.steps, minted = b.minted + k.vouchers,
                     updated_at = now()
FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $26::int[], $27::bigint[], $28::int[])
     AS k(city, program, year, delta, steps, seq, vouchers)
WHERE b.city = k.city AND b.program = k.program AND b.year = k.year AND b.committed + k.delta <= b.amount
  AND b.seq = k.seq
RETURNING b.city, b.program, b.year, b.amount, b.committed, b.seq, b.minted,
          (SELECT count(*) FROM usage) AS usage_rows"""



_eligibility_decoder: Final = msgspec.json.Decoder(ev.Eligibility)
_encoder: Final = msgspec.json.Encoder()


def budget_key(row: asyncpg.Record) -> BudgetKey:
    return BudgetKey(row["city"], row["program"], row["year"])


def budget_state(row: asyncpg.Record) -> BudgetState:
    """A locked budget row (LOCK_BUDGET_SQL, LOCK_BUDGETS_SQL) as the domain sees it."""
    return BudgetState(row["amount"], row["committed"], row["enterprise_cap"], row["year_end"], row["seq"])


def budget_view(row: asyncpg.Record) -> Budget:
    return Budget(city=row["city"], year=row["year"], amount=row["amount"], committed=row["committed"],
                  available=row["amount"] - row["committed"], enterprise_cap=row["enterprise_cap"],
                  year_end=row["year_end"], program=row["program"])


def eligibility_json(eligible: ev.Eligibility | None) -> str | None:
    """The `eligible` column's value (jsonb, NULL: anyone)."""
    return None if eligible is None else _encoder.encode(eligible).decode()


def program_state(row: asyncpg.Record | None) -> ProgramState | None:
    if row is None:
        return None
    eligible = None if row["eligible"] is None else _eligibility_decoder.decode(row["eligible"])
    return ProgramState(name=row["name"], kind=row["kind"], eligible=eligible)


def program_view(row: asyncpg.Record) -> Program:
    state = program_state(row)
    assert state is not None
    return Program(city=row["city"], program=row["program"], name=state.name, kind=state.kind,  # type: ignore
                   eligible=state.eligible)


def voucher_view(row: asyncpg.Record) -> Voucher:
    assert row["returned"] + row["lapsed"] + row["carried"] <= row["amount"]
    return Voucher(voucher_id=row["voucher_id"], city=row["city"], year=row["year"],
                   beneficiary=row["beneficiary"], kind=row["kind"], amount=row["amount"],
                   subsidy_ratio_bp=row["subsidy_ratio_bp"], providers=row["providers"],
                   expires_at=row["expires_at"], status=row["status"], created_at=row["created_at"],
                   returned=row["returned"], lapsed=row["lapsed"], carried=row["carried"],
                   revoked_reason=row["revoked_reason"],
                   revocation_pending=row["revoked_at"] is not None and not row["frozen"], program=row["program"])


# --- queries: a city's vouchers in pages (GET /v1/vouchers), keyset (created_at, voucher_id) ----------------------
# Two statements, not one with "$n IS NULL OR ...", so each plan always uses its index (vouchers_city_created,
# vouchers_city_beneficiary_created); the first page starts before every voucher (queries.FIRST_POSITION). Columns
# are qualified (v.) so that ORDER BY means the uuid column, not the text it is selected as.
_LIST_VOUCHERS: Final = f"""
SELECT {_VOUCHER_COLUMNS} FROM vouchers v
WHERE v.city = $1 {{beneficiary}}AND (v.created_at, v.voucher_id) > ($2::timestamptz, $3::uuid)
  AND ($4::int IS NULL OR v.year = $4) AND ($5::text IS NULL OR v.status = $5)
ORDER BY v.city, {{order_beneficiary}}v.created_at, v.voucher_id LIMIT $6"""
LIST_VOUCHERS_SQL: Final = _LIST_VOUCHERS.format(beneficiary="", order_beneficiary="")
LIST_VOUCHERS_OF_BENEFICIARY_SQL: Final = _LIST_VOUCHERS.format(beneficiary="AND v.beneficiary = $7 ",
                                                                order_beneficiary="v.beneficiary, ")
