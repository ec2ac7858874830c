"""Issuing SQL: named, parameterised statements, and rows mapped to the service's types (the commands run them)."""
from __future__ import annotations

from typing import Final

import asyncpg

from schemas.issuing import Budget, Voucher

from .domain import BudgetState

UPSERT_CITY_SQL: Final = """
INSERT INTO cities AS c (city, name, currency) VALUES ($1, $2, $3)
ON CONFLICT (city) DO UPDATE SET name = EXCLUDED.name, currency = EXCLUDED.currency, updated_at = now()
    WHERE (c.name, c.currency) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.currency)
RETURNING city"""
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
UPSERT_PROVIDER_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities) VALUES ($1, $2, $3)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, updated_at = now()
    WHERE (p.name, p.cities) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.cities)
RETURNING provider"""
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


def budget_state(row: asyncpg.Record) -> BudgetState:
    """A locked budget row (LOCK_BUDGET_SQL, LOCK_BUDGETS_SQL) as the domain sees it."""
    return BudgetState(row["amount"], row["committed"], row["enterprise_cap"], row["year_end"])


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
