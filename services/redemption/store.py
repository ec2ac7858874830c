"""Redemption SQL: named, parameterised statements, and the mapping of their rows to domain states and to the
response types. The transactions that run them are in commands.py (lock order documented there).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Final

import asyncpg

from schemas.events import Invoice
from schemas.redemption import (
    Hold, RedemptionDetail, Statement, StatementRedemption, StatementRefund, StatementTotals, VoucherView,
)

from services.common import outbox

from . import domain

# Provider ids and city ids match ^[a-z0-9][a-z0-9-]{0,62}$, so a comma-joined string round-trips a list through
# unnest (asyncpg cannot pass a ragged text[][]); the statements below split on the same ','.
LIST_SEPARATOR: Final = ","

# --- from the issuing topic ------------------------------------------------------------------------------------------

INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp, providers,
                      expires_at, minted_at, year_end, program)
SELECT v.id, v.city, v.year, v.beneficiary, v.kind, v.amount, v.amount, v.ratio,
       string_to_array(v.providers, ','), v.expires_at, v.minted_at, v.year_end, v.program
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[], $8::text[],
            $9::timestamptz[], $10::timestamptz[], $11::text[], $12::text[])
     AS v(id, city, year, beneficiary, kind, amount, ratio, providers, expires_at, minted_at, year_end, program)
ON CONFLICT (voucher_id) DO NOTHING"""
# A revocation consumed before its voucher's mint (commands._freeze), kept until the mint is written.
PARK_REVOCATION_SQL: Final = """
INSERT INTO early_revocations (voucher_id, event) VALUES ($1, $2) ON CONFLICT (voucher_id) DO NOTHING"""
# The parked revocations of vouchers a consumer batch just minted (in its transaction) ...
TAKE_EARLY_REVOCATIONS_SQL: Final = """
DELETE FROM early_revocations WHERE voucher_id = ANY($1::uuid[]) RETURNING event"""
# ... and those whose mint another transaction wrote meanwhile (the sweeper; SKIP LOCKED: replicas split the work).
TAKE_SETTLEABLE_REVOCATIONS_SQL: Final = """
DELETE FROM early_revocations e WHERE e.voucher_id IN (
    SELECT r.voucher_id FROM early_revocations r JOIN vouchers v USING (voucher_id)
    ORDER BY r.voucher_id LIMIT $1 FOR UPDATE OF r SKIP LOCKED)
RETURNING e.event"""
UPSERT_PROVIDERS_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities, set_at)
SELECT k.provider, k.name, string_to_array(k.cities, ','), k.set_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS k(provider, name, cities, set_at)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, set_at = EXCLUDED.set_at
    WHERE p.set_at <= EXCLUDED.set_at"""
UPSERT_POLICIES_SQL: Final = """
INSERT INTO budget_policies AS p (city, program, year, year_end, set_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::text[], $5::timestamptz[])
ON CONFLICT (city, program, year) DO UPDATE SET year_end = EXCLUDED.year_end, set_at = EXCLUDED.set_at
    WHERE p.set_at <= EXCLUDED.set_at"""

# --- vouchers and redemptions --------------------------------------------------------------------------------------

_VOUCHER_FIELDS: Final = """
v.voucher_id::text, v.city, v.year, v.amount, v.balance, v.held, v.redeemed, v.refunded, v.returned, v.expired,
v.subsidy_ratio_bp, v.providers, v.expires_at, v.status, v.year_end, v.disposition, v.program"""
_VOUCHER_COLUMNS: Final = f"""
SELECT {_VOUCHER_FIELDS},
       (SELECT p.cities FROM providers p WHERE p.provider = $2) AS provider_cities
FROM vouchers v WHERE v.voucher_id = $1"""
# $2: the provider asking (NULL for an admin); provider_cities is NULL when it is not whitelisted anywhere.
GET_VOUCHER_SQL: Final = _VOUCHER_COLUMNS
LOCK_VOUCHER_SQL: Final = _VOUCHER_COLUMNS + "\nFOR UPDATE OF v"
_VOUCHER_RETURNING: Final = "RETURNING amount, balance, held, redeemed, refunded, returned, expired, status"
CLAIM_INVOICE_SQL: Final = """
INSERT INTO subsidised_invoices (provider, invoice_number, invoice_amount, voucher_id, created_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (provider, invoice_number) DO NOTHING
RETURNING true"""
INSERT_REDEMPTION_SQL: Final = """
INSERT INTO redemptions (redemption_id, voucher_id, provider, amount, invoice_number, invoice_amount, created_at,
                         hold_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"""

# --- the redemption writer's batch (commands.write_redemptions): one statement per step for many commands ----------

# The batch's vouchers, locked in id order (the order of every multi-voucher lock here), one row per (voucher,
# provider asking) pair, with the cities that provider is whitelisted for (NULL: nowhere).
LOCK_SPEND_VOUCHERS_SQL: Final = f"""
SELECT {_VOUCHER_FIELDS}, k.provider, p.cities AS provider_cities
FROM unnest($1::uuid[], $2::text[]) AS k(voucher_id, provider)
JOIN vouchers v ON v.voucher_id = k.voucher_id
LEFT JOIN providers p ON p.provider = k.provider
ORDER BY v.voucher_id
FOR UPDATE OF v"""
# Claims in (provider, invoice number) order, so that concurrent batches take them in one order.
CLAIM_INVOICES_SQL: Final = """
INSERT INTO subsidised_invoices (provider, invoice_number, invoice_amount, voucher_id, created_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::timestamptz[])
ORDER BY 1, 2
ON CONFLICT (provider, invoice_number) DO NOTHING
RETURNING provider, invoice_number"""
# A claim whose first claimant was refused passes to the next spend of that invoice in the batch ...
REASSIGN_INVOICES_SQL: Final = """
UPDATE subsidised_invoices s SET invoice_amount = k.amount, voucher_id = k.voucher_id, created_at = k.created_at
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::uuid[], $5::timestamptz[])
     AS k(provider, invoice_number, amount, voucher_id, created_at)
WHERE s.provider = k.provider AND s.invoice_number = k.invoice_number AND s.hold_id IS NULL"""
# ... and a claim no accepted spend of the batch holds is given up (a refused spend claims nothing).
UNCLAIM_INVOICES_SQL: Final = """
DELETE FROM subsidised_invoices s USING unnest($1::text[], $2::text[]) AS k(provider, invoice_number)
WHERE s.provider = k.provider AND s.invoice_number = k.invoice_number AND s.hold_id IS NULL"""
# The batch's whole write in ONE statement (a round trip fewer than debit, then outbox). The final arbiter, per
# voucher for the batch's total ($1, $2, ids sorted): debited only within its balance, and only while active; the
# batch's redemption rows ($3..$9); and their VoucherRedeemed events, queued in the outbox (services/common/outbox.py,
# INSERT_SQL: the same row) in command order ($10: topic, $11: type; key = the voucher id), so that a voucher's rows
# get ids in the order its redemptions were decided. Returns each debited voucher's balance and redeemed.
# Debits, redemption rows and their VoucherRedeemed outbox rows (layout: services.common.outbox) in one statement.
WRITE_REDEMPTIONS_SQL: Final = f"""
WITH debited AS (
    UPDATE vouchers v SET balance = v.balance - k.amount, redeemed = v.redeemed + k.amount
    FROM unnest($1::uuid[], $2::bigint[]) AS k(voucher_id, amount)
    WHERE v.voucher_id = k.voucher_id AND v.balance >= k.amount AND v.status = 'active'
    RETURNING v.voucher_id, v.balance, v.redeemed
), recorded AS (
    INSERT INTO redemptions (redemption_id, voucher_id, provider, amount, invoice_number, invoice_amount, created_at)
    SELECT * FROM unnest($3::uuid[], $4::uuid[], $5::text[], $6::bigint[], $7::text[], $8::bigint[],
                         $9::timestamptz[])
), queued AS (
    INSERT INTO outbox ({outbox.COLUMNS})
    SELECT $10::text, e.key::text, e.event_id, $11::text, e.payload
    FROM unnest($4::uuid[], $12::uuid[], $13::bytea[]) AS e(key, event_id, payload)
)
SELECT voucher_id::text, balance, redeemed FROM debited"""

_REDEMPTION_FIELDS: Final = """
r.redemption_id::text, r.voucher_id::text, r.provider, r.amount, r.refunded, r.hold_id::text, r.invoice_number,
r.invoice_amount, r.created_at"""
GET_REDEMPTION_SQL: Final = f"SELECT {_REDEMPTION_FIELDS} FROM redemptions r WHERE r.redemption_id = $1"
LOCK_REDEMPTION_SQL: Final = GET_REDEMPTION_SQL + "\nFOR UPDATE OF r"

# --- holds -----------------------------------------------------------------------------------------------------------

_HOLD_FIELDS: Final = """
hold_id::text, voucher_id::text, provider, amount, status, void_reason, captured, released, redemption_id::text,
invoice_number, invoice_amount, expires_at, created_at"""
HOLD_VOUCHER_SQL: Final = "SELECT voucher_id::text FROM holds WHERE hold_id = $1"
GET_HOLD_SQL: Final = f"SELECT {_HOLD_FIELDS} FROM holds WHERE hold_id = $1"
LOCK_HOLD_SQL: Final = GET_HOLD_SQL + "\nFOR UPDATE"
COUNT_OPEN_HOLDS_SQL: Final = "SELECT count(*) FROM holds WHERE voucher_id = $1 AND status = 'active'"
INSERT_HOLD_SQL: Final = f"""
INSERT INTO holds (hold_id, voucher_id, provider, amount, invoice_number, invoice_amount, expires_at, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING {_HOLD_FIELDS}"""
ATTACH_INVOICE_SQL: Final = """
UPDATE subsidised_invoices SET hold_id = $3 WHERE provider = $1 AND invoice_number = $2 AND hold_id IS NULL
RETURNING true"""
# Held amounts count against the balance at once.
RESERVE_SQL: Final = f"""
UPDATE vouchers SET balance = balance - $2, held = held + $2
WHERE voucher_id = $1 AND balance >= $2 AND status = 'active'
{_VOUCHER_RETURNING}"""
CAPTURE_HOLD_SQL: Final = f"""
UPDATE holds SET status = 'captured', captured = $2, released = amount - $2, redemption_id = $3, settled_at = $4
WHERE hold_id = $1 AND status = 'active' AND amount >= $2
RETURNING {_HOLD_FIELDS}"""
# $2: the held amount settled; $3: of it, captured (the rest goes back to the balance).
SETTLE_HELD_SQL: Final = f"""
UPDATE vouchers SET held = held - $2::bigint, redeemed = redeemed + $3::bigint,
                    balance = balance + ($2::bigint - $3::bigint)
WHERE voucher_id = $1 AND held >= $2::bigint AND $3::bigint <= $2::bigint
{_VOUCHER_RETURNING}"""
LOCK_OPEN_HOLDS_SQL: Final = f"""
SELECT {_HOLD_FIELDS} FROM holds WHERE voucher_id = $1 AND status = 'active' ORDER BY hold_id FOR UPDATE"""
LOCK_TIMED_OUT_HOLDS_SQL: Final = f"""
SELECT {_HOLD_FIELDS} FROM holds WHERE voucher_id = $1 AND status = 'active' AND expires_at <= $2
ORDER BY hold_id FOR UPDATE"""
VOID_HOLDS_SQL: Final = f"""
UPDATE holds SET status = $2, void_reason = $3, captured = 0, released = amount, settled_at = $4
WHERE hold_id = ANY($1::uuid[]) AND status = 'active'
RETURNING {_HOLD_FIELDS}"""
RELEASE_INVOICES_SQL: Final = "DELETE FROM subsidised_invoices WHERE hold_id = ANY($1::uuid[])"

# --- refunds ---------------------------------------------------------------------------------------------------------

REFUND_REDEMPTION_SQL: Final = """
UPDATE redemptions SET refunded = refunded + $2 WHERE redemption_id = $1 AND refunded + $2 <= amount
RETURNING amount, refunded"""
# $2: refunded; then where it went: $3 back to the balance, $4 returned to the budget, $5 expired (lapse/carry).
REFUND_VOUCHER_SQL: Final = f"""
UPDATE vouchers SET refunded = refunded + $2::bigint, balance = balance + $3::bigint,
                    returned = returned + $4::bigint, expired = expired + $5::bigint
WHERE voucher_id = $1 AND $2::bigint = $3::bigint + $4::bigint + $5::bigint
{_VOUCHER_RETURNING}"""
INSERT_REFUND_SQL: Final = """
INSERT INTO refunds (refund_id, redemption_id, voucher_id, provider, amount, returned_to, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""

# --- revocation (freeze) and expiry ----------------------------------------------------------------------------------

FREEZE_SQL: Final = f"""
UPDATE vouchers SET returned = returned + balance, balance = 0, status = 'revoked', frozen_at = $2
WHERE voucher_id = $1 AND status = 'active' AND held = 0
{_VOUCHER_RETURNING}"""
DUE_HOLD_VOUCHERS_SQL: Final = """
SELECT voucher_id::text FROM holds WHERE status = 'active' AND expires_at <= $1
GROUP BY voucher_id ORDER BY min(expires_at) LIMIT $2"""
# A consumer batch takes all its vouchers' locks first, in id order, before it writes anything: so it never holds
# a row (an invoice claim it deletes, say) that a request waits for while itself waiting for that request's voucher.
LOCK_VOUCHERS_SQL: Final = """
SELECT voucher_id::text FROM vouchers WHERE voucher_id = ANY($1::uuid[]) ORDER BY voucher_id FOR UPDATE"""
LOCK_VOUCHERS_SKIP_LOCKED_SQL: Final = f"""
SELECT {_VOUCHER_FIELDS} FROM vouchers v WHERE v.voucher_id = ANY($1::uuid[])
ORDER BY v.voucher_id FOR UPDATE SKIP LOCKED"""
# Rows another transaction holds are skipped, not waited for: they are taken by the next round (or by that
# transaction, which settles them itself), so several replicas sweep side by side without blocking each other.
LOCK_DUE_VOUCHERS_SQL: Final = f"""
SELECT {_VOUCHER_FIELDS}, p.year_end AS budget_policy
FROM vouchers v LEFT JOIN budget_policies p ON p.city = v.city AND p.program = v.program AND p.year = v.year
WHERE v.status = 'active' AND v.expires_at <= $1 AND v.held = 0
ORDER BY v.expires_at LIMIT $2
FOR UPDATE OF v SKIP LOCKED"""
EXPIRE_VOUCHERS_SQL: Final = """
UPDATE vouchers v SET expired = v.expired + v.balance, balance = 0, status = 'expired', disposition = k.disposition,
                      expired_at = $3
FROM unnest($1::uuid[], $2::text[]) AS k(voucher_id, disposition)
WHERE v.voucher_id = k.voucher_id AND v.status = 'active' AND v.held = 0
RETURNING v.voucher_id::text, v.amount, v.balance, v.held, v.redeemed, v.refunded, v.returned, v.expired,
          v.status, v.disposition"""

# --- statements ------------------------------------------------------------------------------------------------------
# from inclusive, to exclusive; NULL: unbounded. $4: a city (for a city-scoped auditor) or NULL.
_PERIOD: Final = """
x.provider = $1 AND ($2::timestamptz IS NULL OR x.created_at >= $2) AND ($3::timestamptz IS NULL OR x.created_at < $3)
AND ($4::text IS NULL OR v.city = $4)"""
STATEMENT_REDEMPTIONS_SQL: Final = f"""
SELECT x.redemption_id::text, x.voucher_id::text, v.city, v.year, x.amount, x.hold_id::text, x.invoice_number,
       x.invoice_amount, x.created_at
FROM redemptions x JOIN vouchers v USING (voucher_id)
WHERE {_PERIOD}
ORDER BY x.created_at, x.redemption_id LIMIT $5"""
STATEMENT_REFUNDS_SQL: Final = f"""
SELECT x.refund_id::text, x.redemption_id::text, x.voucher_id::text, v.city, v.year, x.amount, x.created_at
FROM refunds x JOIN vouchers v USING (voucher_id)
WHERE {_PERIOD}
ORDER BY x.created_at, x.refund_id LIMIT $5"""
STATEMENT_TOTALS_SQL: Final = f"""
SELECT (SELECT count(*) FROM redemptions x JOIN vouchers v USING (voucher_id) WHERE {_PERIOD}) AS redemptions,
       (SELECT coalesce(sum(x.amount), 0) FROM redemptions x JOIN vouchers v USING (voucher_id) WHERE {_PERIOD})
           AS redeemed,
       (SELECT count(*) FROM refunds x JOIN vouchers v USING (voucher_id) WHERE {_PERIOD}) AS refunds,
       (SELECT coalesce(sum(x.amount), 0) FROM refunds x JOIN vouchers v USING (voucher_id) WHERE {_PERIOD})
           AS refunded"""


# --- row conversions -------------------------------------------------------------------------------------------------

def voucher_state(row: asyncpg.Record | dict) -> domain.VoucherState:
    v = domain.VoucherState(
        voucher_id=row["voucher_id"], city=row["city"], year=row["year"], amount=row["amount"],
        balance=row["balance"], held=row["held"], redeemed=row["redeemed"], refunded=row["refunded"],
        subsidy_ratio_bp=row["subsidy_ratio_bp"], providers=row["providers"], expires_at=row["expires_at"],
        status=row["status"], returned=row["returned"], expired=row["expired"], year_end=row["year_end"],
        disposition=row["disposition"], program=row["program"])
    domain.assert_value_conserved(v)
    return v


def voucher_after(v: domain.VoucherState, row: asyncpg.Record | None) -> domain.VoucherState:
    """The voucher as a conditional UPDATE left it (checked: conserved, never overdrawn)."""
    assert row is not None, f"voucher {v.voucher_id}: the locked voucher refused an update its checks allowed"
    after = dataclasses.replace(v, **dict(row))
    domain.assert_value_conserved(after)
    return after


def voucher_view(v: domain.VoucherState, now: dt.datetime) -> VoucherView:
    return VoucherView(voucher_id=v.voucher_id, city=v.city, amount=v.amount, balance=v.balance, held=v.held,
                       expires_at=v.expires_at, status=domain.status_at(v, now), program=v.program)


def hold_state(row: asyncpg.Record) -> domain.HoldState:
    return domain.HoldState(hold_id=row["hold_id"], voucher_id=row["voucher_id"], provider=row["provider"],
                            amount=row["amount"], status=row["status"], expires_at=row["expires_at"])


def invoice_of(number: str | None, amount: int | None) -> Invoice | None:
    return Invoice(number=number, amount=amount) if number is not None else None  # type: ignore[arg-type]


def hold_view(row: asyncpg.Record, now: dt.datetime) -> Hold:
    status = domain.hold_status_at(hold_state(row), now)
    return Hold(hold_id=row["hold_id"], voucher_id=row["voucher_id"], provider=row["provider"], amount=row["amount"],
                expires_at=row["expires_at"], status=status, created_at=row["created_at"],  # type: ignore[arg-type]
                captured=row["captured"], released=row["released"], redemption_id=row["redemption_id"],
                reason=row["void_reason"] or ("expired" if status == "expired" else None),
                invoice=invoice_of(row["invoice_number"], row["invoice_amount"]))


def redemption_detail(row: asyncpg.Record) -> RedemptionDetail:
    assert 0 <= row["refunded"] <= row["amount"]
    return RedemptionDetail(redemption_id=row["redemption_id"], voucher_id=row["voucher_id"],
                            provider=row["provider"], amount=row["amount"], refunded=row["refunded"],
                            refundable=row["amount"] - row["refunded"], hold_id=row["hold_id"],
                            invoice=invoice_of(row["invoice_number"], row["invoice_amount"]),
                            created_at=row["created_at"])


def joined(ids: list[str] | None) -> str | None:
    """A list parameter for the unnest statements (split back with string_to_array on LIST_SEPARATOR)."""
    if ids is None:
        return None
    assert all(LIST_SEPARATOR not in i for i in ids)
    return LIST_SEPARATOR.join(ids)


def statement_of(provider: str, city: str | None, start: dt.datetime | None, end: dt.datetime | None,
                 totals: asyncpg.Record, redemptions: list[asyncpg.Record], refunds: list[asyncpg.Record]
                 ) -> Statement:
    """A statement from one snapshot's rows; when no line was cut off, the lines add up to the totals."""
    lines = [StatementRedemption(redemption_id=r["redemption_id"], voucher_id=r["voucher_id"], city=r["city"],
                                 year=r["year"], amount=r["amount"], hold_id=r["hold_id"],
                                 invoice=invoice_of(r["invoice_number"], r["invoice_amount"]),
                                 created_at=r["created_at"]) for r in redemptions]
    refund_lines = [StatementRefund(refund_id=r["refund_id"], redemption_id=r["redemption_id"],
                                    voucher_id=r["voucher_id"], city=r["city"], year=r["year"], amount=r["amount"],
                                    created_at=r["created_at"]) for r in refunds]
    truncated = totals["redemptions"] > len(lines) or totals["refunds"] > len(refund_lines)
    if not truncated:
        assert sum(x.amount for x in lines) == totals["redeemed"]
        assert sum(x.amount for x in refund_lines) == totals["refunded"]
    return Statement(provider=provider, city=city, from_=start, to=end, redemptions=lines, refunds=refund_lines,
                     totals=StatementTotals(redemptions=totals["redemptions"], refunds=totals["refunds"],
                                            redeemed=int(totals["redeemed"]), refunded=int(totals["refunded"]),
                                            net=int(totals["redeemed"]) - int(totals["refunded"])),
                     truncated=truncated)


# --- queries: redemptions in pages (GET /v1/redemptions), keyset (created_at, redemption_id) -------------------------
# [$4, $5) is the period (the caller passes the widest times for an unbounded side), ($2, $3) the position after
# which the page starts; $6 a city (a city-scoped auditor) or NULL. One statement per access path, so that each plan
# keeps its index: a provider's (redemptions_provider_created_at, then sorted by id within a created_at), a voucher's
# (redemptions_voucher; $1 a provider or NULL), or everyone's (redemptions_created; $1 NULL).
_LIST_REDEMPTIONS: Final = f"""
SELECT {_REDEMPTION_FIELDS} FROM redemptions r
WHERE {{which}} AND r.created_at >= greatest($2::timestamptz, $4::timestamptz) AND r.created_at < $5
  AND (r.created_at, r.redemption_id) > ($2, $3::uuid)
  AND ($6::text IS NULL OR EXISTS (SELECT 1 FROM vouchers v WHERE v.voucher_id = r.voucher_id AND v.city = $6))
ORDER BY r.created_at, r.redemption_id LIMIT $7"""
LIST_PROVIDER_REDEMPTIONS_SQL: Final = _LIST_REDEMPTIONS.format(which="r.provider = $1")
LIST_VOUCHER_REDEMPTIONS_SQL: Final = _LIST_REDEMPTIONS.format(
    which="r.voucher_id = $8::uuid AND ($1::text IS NULL OR r.provider = $1)")
LIST_ALL_REDEMPTIONS_SQL: Final = _LIST_REDEMPTIONS.format(which="($1::text IS NULL OR r.provider = $1)")
