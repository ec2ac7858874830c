"""Redemption SQL: named, parameterised statements, the issuing-event handler and the command transactions
(redeem, holds, refunds), the freeze of a revoked voucher, and the sweepers' transactions.

Lock order, everywhere: the voucher row first, then its holds or redemptions. So a capture, a void, a refund, the
hold timeout sweeper, the expiry sweeper and a revocation's freeze are serialised per voucher; each sees the others'
committed effects, and a hold is settled exactly once. The sweepers lock vouchers with SKIP LOCKED (never wait),
and consumers lock several vouchers in id order, so no two transactions wait on each other in a cycle.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from schemas import events as ev
from schemas.events import Invoice
from schemas.redemption import (
    CaptureIn, Hold, HoldIn, Redemption, RedemptionDetail, RedemptionIn, Refund, RefundIn, Statement,
    StatementRedemption, StatementRefund, StatementTotals, VoucherView,
)

from services.common import outbox
from services.common.consumer import Delivered
from services.common.errors import InvoiceAlreadySubsidised, NotFound
from schemas.limits import OPEN_HOLDS_PER_VOUCHER_MAX, STATEMENT_LINES_MAX

from . import domain

log = logging.getLogger("cvl.redemption.store")

# Provider ids and city ids match ^[a-z0-9][a-z0-9-]{0,62}$, so a comma-joined string round-trips a list through
# unnest (asyncpg cannot pass a ragged text[][]); the statements below split on the same ','.
LIST_SEPARATOR: Final = ","
PRODUCER: Final = "redemption"
ACTOR_HOLD_SWEEPER: Final = "system:hold-sweeper"
ACTOR_EXPIRY_SWEEPER: Final = "system:expiry-sweeper"

# --- from the issuing topic ------------------------------------------------------------------------------------------

INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp, providers,
                      expires_at, minted_at, year_end)
SELECT v.id, v.city, v.year, v.beneficiary, v.kind, v.amount, v.amount, v.ratio,
       string_to_array(v.providers, ','), v.expires_at, v.minted_at, v.year_end
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[], $8::text[],
            $9::timestamptz[], $10::timestamptz[], $11::text[])
     AS v(id, city, year, beneficiary, kind, amount, ratio, providers, expires_at, minted_at, year_end)
ON CONFLICT (voucher_id) DO NOTHING"""
UPSERT_PROVIDERS_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities, set_at)
SELECT k.provider, k.name, string_to_array(k.cities, ','), k.set_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS k(provider, name, cities, set_at)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, set_at = EXCLUDED.set_at
    WHERE p.set_at <= EXCLUDED.set_at"""
UPSERT_POLICIES_SQL: Final = """
INSERT INTO budget_policies AS p (city, year, year_end, set_at)
SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[])
ON CONFLICT (city, year) DO UPDATE SET year_end = EXCLUDED.year_end, set_at = EXCLUDED.set_at
    WHERE p.set_at <= EXCLUDED.set_at"""

# --- vouchers and redemptions --------------------------------------------------------------------------------------

_VOUCHER_FIELDS: Final = """
v.voucher_id::text, v.city, v.year, v.amount, v.balance, v.held, v.redeemed, v.refunded, v.returned, v.expired,
v.subsidy_ratio_bp, v.providers, v.expires_at, v.status, v.year_end, v.disposition"""
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
# The final arbiter: a voucher is only ever debited within its balance, and only while active.
DEBIT_VOUCHER_SQL: Final = f"""
UPDATE vouchers SET balance = balance - $2, redeemed = redeemed + $2
WHERE voucher_id = $1 AND balance >= $2 AND status = 'active'
{_VOUCHER_RETURNING}"""
INSERT_REDEMPTION_SQL: Final = """
INSERT INTO redemptions (redemption_id, voucher_id, provider, amount, invoice_number, invoice_amount, created_at,
                         hold_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"""
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
FROM vouchers v LEFT JOIN budget_policies p ON p.city = v.city AND p.year = v.year
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
        disposition=row["disposition"])
    domain.assert_value_conserved(v)
    return v


def _after(v: domain.VoucherState, row: asyncpg.Record | None) -> domain.VoucherState:
    """The voucher as a conditional UPDATE left it (checked: conserved, never overdrawn)."""
    assert row is not None, f"voucher {v.voucher_id}: the locked voucher refused an update its checks allowed"
    after = dataclasses.replace(v, **dict(row))
    domain.assert_value_conserved(after)
    return after


def voucher_view(v: domain.VoucherState, now: dt.datetime) -> VoucherView:
    return VoucherView(voucher_id=v.voucher_id, city=v.city, amount=v.amount, balance=v.balance, held=v.held,
                       expires_at=v.expires_at, status=domain.status_at(v, now))


def hold_state(row: asyncpg.Record) -> domain.HoldState:
    return domain.HoldState(hold_id=row["hold_id"], voucher_id=row["voucher_id"], provider=row["provider"],
                            amount=row["amount"], status=row["status"], expires_at=row["expires_at"])


def _invoice(number: str | None, amount: int | None) -> Invoice | None:
    return Invoice(number=number, amount=amount) if number is not None else None  # type: ignore[arg-type]


def hold_view(row: asyncpg.Record, now: dt.datetime) -> Hold:
    status = domain.hold_status_at(hold_state(row), now)
    return Hold(hold_id=row["hold_id"], voucher_id=row["voucher_id"], provider=row["provider"], amount=row["amount"],
                expires_at=row["expires_at"], status=status, created_at=row["created_at"],  # type: ignore[arg-type]
                captured=row["captured"], released=row["released"], redemption_id=row["redemption_id"],
                reason=row["void_reason"] or ("expired" if status == "expired" else None),
                invoice=_invoice(row["invoice_number"], row["invoice_amount"]))


def redemption_detail(row: asyncpg.Record) -> RedemptionDetail:
    assert 0 <= row["refunded"] <= row["amount"]
    return RedemptionDetail(redemption_id=row["redemption_id"], voucher_id=row["voucher_id"],
                            provider=row["provider"], amount=row["amount"], refunded=row["refunded"],
                            refundable=row["amount"] - row["refunded"], hold_id=row["hold_id"],
                            invoice=_invoice(row["invoice_number"], row["invoice_amount"]),
                            created_at=row["created_at"])


def _joined(ids: list[str] | None) -> str | None:
    if ids is None:
        return None
    assert all(LIST_SEPARATOR not in i for i in ids)
    return LIST_SEPARATOR.join(ids)


def _event(topic: str, key: str, cls: type[ev.Envelope], data: Any, actor: str, now: dt.datetime):
    return topic, key, outbox.envelope(cls, data, producer=PRODUCER, actor=actor, occurred_at=now)


# --- the issuing topic -----------------------------------------------------------------------------------------------

@dataclass
class IssuingBatch:
    """What one consumer batch did here (for the caller's metrics and logs)."""

    frozen: list[tuple[str, int]] = dataclasses.field(default_factory=list)   # (city, returned) per voucher frozen
    holds_voided: int = 0
    unknown_revocations: list[str] = dataclasses.field(default_factory=list)


async def apply_issuing_events(conn: asyncpg.Connection, delivered: list[Delivered], *, topic: str,
                               now: dt.datetime) -> IssuingBatch:
    """Consumer handler (in the batch's transaction, fresh events only): vouchers minted, whitelists and year-end
    policies set, and revocations, which freeze their voucher here (the saga's middle step).

    Written as one multi-row statement per kind, in key order so that concurrent writers lock rows in one order.
    Mints are written before revocations: a voucher's VoucherRevoked always follows its VoucherMinted (same key,
    same partition), possibly in the same batch. Other issuing events are not needed here.
    """
    assert conn.is_in_transaction()
    minted: dict[str, ev.VoucherMintedData] = {}
    whitelists: dict[str, ev.ProviderSet] = {}
    policies: dict[tuple[str, int], ev.BudgetSet] = {}
    revocations: dict[str, ev.VoucherRevoked] = {}
    for d in delivered:
        match d.event:
            case ev.VoucherMinted(data=data):
                minted.setdefault(data.voucher_id, data)
            case ev.ProviderSet(data=data) as event:
                # Same key, same partition: delivery order is publication order; occurred_at decides otherwise.
                latest = whitelists.get(data.provider)
                if latest is None or latest.occurred_at <= event.occurred_at:
                    whitelists[data.provider] = event
            case ev.BudgetSet(data=data) as event:
                latest_budget = policies.get((data.city, data.year))
                if latest_budget is None or latest_budget.occurred_at <= event.occurred_at:
                    policies[(data.city, data.year)] = event
            case ev.VoucherRevoked(data=data) as event:
                revocations.setdefault(data.voucher_id, event)
            case _:
                pass
    if minted:
        rows = [minted[k] for k in sorted(minted)]
        await conn.execute(
            INSERT_VOUCHERS_SQL, [m.voucher_id for m in rows], [m.city for m in rows], [m.year for m in rows],
            [m.beneficiary for m in rows], [m.kind for m in rows], [m.amount for m in rows],
            [m.subsidy_ratio_bp for m in rows], [_joined(m.providers) for m in rows], [m.expires_at for m in rows],
            [m.created_at for m in rows], [m.year_end for m in rows])
    if whitelists:
        sets = [whitelists[k] for k in sorted(whitelists)]
        await conn.execute(
            UPSERT_PROVIDERS_SQL, [s.data.provider for s in sets], [s.data.name for s in sets],
            [_joined(s.data.cities) for s in sets], [s.occurred_at for s in sets])
    if policies:
        budgets = [policies[k] for k in sorted(policies)]
        await conn.execute(
            UPSERT_POLICIES_SQL, [b.data.city for b in budgets], [b.data.year for b in budgets],
            [b.data.year_end for b in budgets], [b.occurred_at for b in budgets])
    outcome = IssuingBatch()
    if revocations:
        rows_out: list = []
        await conn.fetch(LOCK_VOUCHERS_SQL, sorted(revocations))
        for voucher_id in sorted(revocations):
            await freeze(conn, revocations[voucher_id], topic=topic, now=now, out=rows_out, outcome=outcome)
        await outbox.append(conn, rows_out)
    return outcome


async def freeze(conn: asyncpg.Connection, revoked: ev.VoucherRevoked, *, topic: str, now: dt.datetime,
                 out: list, outcome: IssuingBatch) -> None:
    """Freeze a revoked voucher: void its open holds (reason "revoked"), move its whole balance out to the budget,
    and announce that as VoucherFrozen. After this, holds and redemptions are refused (409 voucher_revoked).

    Under the voucher's row lock, so it is serialised with every redemption, capture and refund: what committed
    before is spent, what comes after is refused (or, for a refund, passed on to the budget).
    """
    d = revoked.data
    row = await conn.fetchrow(LOCK_VOUCHER_SQL, d.voucher_id, None)
    if row is None:  # cannot happen while mints precede revocations on the topic; never block the consumer on it
        outcome.unknown_revocations.append(d.voucher_id)
        return
    voucher = voucher_state(row)
    if voucher.status == "revoked":
        return
    if voucher.status == "expired":  # expiry came first and already moved the value: the saga ends with nothing
        out.append(_event(topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
            voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=0, reason=d.reason),
            revoked.actor, now))
        outcome.frozen.append((voucher.city, 0))
        return
    holds = await conn.fetch(LOCK_OPEN_HOLDS_SQL, voucher.voucher_id)
    voucher = await _void_holds(conn, voucher, holds, status="voided", reason="revoked", topic=topic, now=now,
                                actor=revoked.actor, out=out)
    outcome.holds_voided += len(holds)
    frozen = _after(voucher, await conn.fetchrow(FREEZE_SQL, voucher.voucher_id, now))
    returned = voucher.balance
    assert frozen.status == "revoked" and frozen.returned == voucher.returned + returned
    out.append(_event(topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
        voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=returned, reason=d.reason),
        revoked.actor, now))
    outcome.frozen.append((voucher.city, returned))


async def _void_holds(conn: asyncpg.Connection, voucher: domain.VoucherState, holds: list[asyncpg.Record], *,
                      status: str, reason: str, topic: str, now: dt.datetime, actor: str,
                      out: list) -> domain.VoucherState:
    """Void locked, active holds of a locked voucher: their amounts go back to its balance, their invoices are
    released (nothing was subsidised), and each is announced as HoldVoided."""
    if not holds:
        return voucher
    ids = [h["hold_id"] for h in holds]
    voided = await conn.fetch(VOID_HOLDS_SQL, ids, status, reason, now)
    assert len(voided) == len(holds), "a locked active hold refused to be voided"
    await conn.execute(RELEASE_INVOICES_SQL, ids)
    total = sum(h["amount"] for h in holds)
    after = _after(voucher, await conn.fetchrow(SETTLE_HELD_SQL, voucher.voucher_id, total, 0))
    assert after.held == voucher.held - total and after.balance == voucher.balance + total
    for h in voided:
        out.append(_event(topic, voucher.voucher_id, ev.HoldVoided, ev.HoldVoidedData(
            hold_id=h["hold_id"], voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year,
            provider=h["provider"], amount=h["amount"], reason=reason), actor, now))  # type: ignore[arg-type]
    return after


# --- redeem ----------------------------------------------------------------------------------------------------------

@dataclass
class RedeemAttempt:
    """What the HTTP edge needs for its metrics, filled in as the command runs."""

    city: str | None = None
    redemption: Redemption | None = None


async def _lock_voucher(conn: asyncpg.Connection, voucher_id: str, provider: str | None,
                        field: str | None = "voucher_id") -> tuple[domain.VoucherState, asyncpg.Record]:
    row = await conn.fetchrow(LOCK_VOUCHER_SQL, voucher_id, provider)
    if row is None:
        raise NotFound(f"no voucher {voucher_id} (a new voucher is redeemable once its mint event is consumed)",
                       field=field)
    return voucher_state(row), row


async def _claim_invoice(conn: asyncpg.Connection, provider: str, invoice: Invoice | None, voucher_id: str,
                         now: dt.datetime) -> None:
    if invoice is not None and not await conn.fetchval(CLAIM_INVOICE_SQL, provider, invoice.number, invoice.amount,
                                                       voucher_id, now):
        raise InvoiceAlreadySubsidised(f"invoice {invoice.number} of {provider} has already been subsidised",
                                       field="invoice.number")


async def redeem(conn: asyncpg.Connection, body: RedemptionIn, *, provider: str, actor: str, topic: str,
                 now: dt.datetime, attempt: RedeemAttempt) -> Redemption:
    """Debit a voucher for a provider in the caller's transaction, or raise the refusal (nothing is written then).

    The voucher's row lock serialises redemptions of one voucher; the conditional debit and the table's CHECKs
    keep the balance whole even if that lock were ever missed.
    """
    assert conn.is_in_transaction()
    voucher, row = await _lock_voucher(conn, body.voucher_id, provider)
    attempt.city = voucher.city
    domain.check_redeemable(voucher, provider, row["provider_cities"], body.amount, body.invoice, now)
    invoice = body.invoice
    await _claim_invoice(conn, provider, invoice, voucher.voucher_id, now)
    domain.check_sufficient_balance(voucher, body.amount)

    after = _after(voucher, await conn.fetchrow(DEBIT_VOUCHER_SQL, voucher.voucher_id, body.amount))
    assert after.balance == voucher.balance - body.amount

    redemption_id = str(uuid.uuid4())
    await conn.execute(INSERT_REDEMPTION_SQL, redemption_id, voucher.voucher_id, provider, body.amount,
                       invoice.number if invoice else None, invoice.amount if invoice else None, now, None)
    data = ev.VoucherRedeemedData(redemption_id=redemption_id, voucher_id=voucher.voucher_id, city=voucher.city,
                                  year=voucher.year, provider=provider, amount=body.amount, balance=after.balance,
                                  invoice=invoice)
    await outbox.append(conn, [_event(topic, voucher.voucher_id, ev.VoucherRedeemed, data, actor, now)])
    attempt.redemption = Redemption(redemption_id=redemption_id, voucher_id=voucher.voucher_id, provider=provider,
                                    amount=body.amount, balance=after.balance)
    return attempt.redemption


# --- holds -----------------------------------------------------------------------------------------------------------

@dataclass
class HoldAttempt:
    """What the HTTP edge needs for its metrics, filled in as a hold command runs."""

    city: str | None = None
    outcome: str | None = None   # placed | captured | voided, once written
    amount: int = 0              # placed or captured
    released: int = 0


async def place_hold(conn: asyncpg.Connection, body: HoldIn, *, provider: str, actor: str, topic: str,
                     now: dt.datetime, attempt: HoldAttempt) -> Hold:
    """Reserve part of a voucher for a provider until it captures or voids the hold, or the hold times out.

    The same rules as a redemption apply now (revoked → expired → eligibility → invoice → balance): a capture later
    takes at most the held amount, so it stays within them.
    """
    assert conn.is_in_transaction()
    voucher, row = await _lock_voucher(conn, body.voucher_id, provider)
    attempt.city = voucher.city
    domain.check_redeemable(voucher, provider, row["provider_cities"], body.amount, body.invoice, now)
    invoice = body.invoice
    await _claim_invoice(conn, provider, invoice, voucher.voucher_id, now)
    domain.check_sufficient_balance(voucher, body.amount)
    domain.check_open_holds(voucher, await conn.fetchval(COUNT_OPEN_HOLDS_SQL, voucher.voucher_id),
                            OPEN_HOLDS_PER_VOUCHER_MAX)

    after = _after(voucher, await conn.fetchrow(RESERVE_SQL, voucher.voucher_id, body.amount))
    assert after.held == voucher.held + body.amount
    hold_id = str(uuid.uuid4())
    expires_at = now + dt.timedelta(seconds=body.timeout_s)
    hold = await conn.fetchrow(INSERT_HOLD_SQL, hold_id, voucher.voucher_id, provider, body.amount,
                               invoice.number if invoice else None, invoice.amount if invoice else None, expires_at,
                               now)
    if invoice is not None:
        assert await conn.fetchval(ATTACH_INVOICE_SQL, provider, invoice.number, hold_id)
    data = ev.HoldPlacedData(hold_id=hold_id, voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year,
                             provider=provider, amount=body.amount, expires_at=expires_at, invoice=invoice)
    await outbox.append(conn, [_event(topic, voucher.voucher_id, ev.HoldPlaced, data, actor, now)])
    attempt.outcome, attempt.amount = "placed", body.amount
    return hold_view(hold, now)


async def _lock_hold(conn: asyncpg.Connection, hold_id: str, provider: str | None
                     ) -> tuple[domain.VoucherState, asyncpg.Record, asyncpg.Record]:
    """The hold's voucher, then the hold, locked in that order (the order every writer of both uses)."""
    voucher_id = await conn.fetchval(HOLD_VOUCHER_SQL, hold_id)
    if voucher_id is None:
        raise NotFound(f"no hold {hold_id}")
    voucher, row = await _lock_voucher(conn, voucher_id, provider, field=None)
    hold = await conn.fetchrow(LOCK_HOLD_SQL, hold_id)
    assert hold is not None and hold["voucher_id"] == voucher_id
    return voucher, row, hold


async def capture_hold(conn: asyncpg.Connection, hold_id: str, body: CaptureIn, *, provider: str, actor: str,
                       topic: str, now: dt.datetime, attempt: HoldAttempt) -> Hold:
    """Capture up to the held amount (all of it when no amount is given); the rest goes back to the balance. The
    capture becomes a redemption (refundable like any other).

    Exactly one of a capture, a void, the timeout and a revocation settles a hold: each locks the voucher and then
    the hold, and acts only on an active hold before its expires_at.
    """
    assert conn.is_in_transaction()
    voucher, row, hold_row = await _lock_hold(conn, hold_id, provider)
    hold = hold_state(hold_row)
    attempt.city = voucher.city
    domain.check_hold_owner(hold, provider)
    domain.check_hold_active(hold, now, hold_row["void_reason"])
    assert voucher.status == "active", "a frozen or expired voucher has no active hold"
    domain.check_provider_eligible(voucher, provider, row["provider_cities"])
    amount = hold.amount if body.amount is None else body.amount
    domain.check_within_hold(hold, amount)

    redemption_id = str(uuid.uuid4())
    captured = await conn.fetchrow(CAPTURE_HOLD_SQL, hold_id, amount, redemption_id, now)
    assert captured is not None
    after = _after(voucher, await conn.fetchrow(SETTLE_HELD_SQL, voucher.voucher_id, hold.amount, amount))
    assert after.held == voucher.held - hold.amount and after.redeemed == voucher.redeemed + amount
    invoice = _invoice(hold_row["invoice_number"], hold_row["invoice_amount"])
    await conn.execute(INSERT_REDEMPTION_SQL, redemption_id, voucher.voucher_id, provider, amount,
                       hold_row["invoice_number"], hold_row["invoice_amount"], now, hold_id)
    data = ev.HoldCapturedData(hold_id=hold_id, voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year,
                               provider=provider, captured=amount, released=hold.amount - amount,
                               redemption_id=redemption_id, invoice=invoice)
    await outbox.append(conn, [_event(topic, voucher.voucher_id, ev.HoldCaptured, data, actor, now)])
    attempt.outcome, attempt.amount, attempt.released = "captured", amount, hold.amount - amount
    return hold_view(captured, now)


async def void_hold(conn: asyncpg.Connection, hold_id: str, *, provider: str, actor: str, topic: str,
                    now: dt.datetime, attempt: HoldAttempt) -> Hold:
    """Release a hold: its whole amount goes back to the voucher's balance (and its invoice is released)."""
    assert conn.is_in_transaction()
    voucher, _row, hold_row = await _lock_hold(conn, hold_id, provider)
    hold = hold_state(hold_row)
    attempt.city = voucher.city
    domain.check_hold_owner(hold, provider)
    domain.check_hold_active(hold, now, hold_row["void_reason"])
    out: list = []
    await _void_holds(conn, voucher, [hold_row], status="voided", reason="voided", topic=topic, now=now, actor=actor,
                      out=out)
    await outbox.append(conn, out)
    attempt.outcome, attempt.released = "voided", hold.amount
    voided = await conn.fetchrow(GET_HOLD_SQL, hold_id)
    return hold_view(voided, now)


# --- refunds ---------------------------------------------------------------------------------------------------------

@dataclass
class RefundAttempt:
    city: str | None = None
    refund: Refund | None = None


async def refund(conn: asyncpg.Connection, redemption_id: str, body: RefundIn, *, provider: str, actor: str,
                 topic: str, now: dt.datetime, attempt: RefundAttempt) -> Refund:
    """Return part of a redemption (or of a captured hold) to its voucher; in total at most what it redeemed.

    The voucher and then the redemption are locked, so concurrent refunds of one redemption are serialised and
    their total is checked against what is already refunded (and again by the table's CHECK). On a revoked voucher
    the value goes on to the budget at once (VoucherFrozen with refund_id); on an expired one as its year-end
    disposition says (VoucherExpired with refund_id): value never lands on a voucher that can no longer spend it.
    """
    assert conn.is_in_transaction()
    found = await conn.fetchrow(GET_REDEMPTION_SQL, redemption_id)
    if found is None:
        raise NotFound(f"no redemption {redemption_id}")
    domain.check_refund_owner(found["provider"], redemption_id, provider)
    voucher, _row = await _lock_voucher(conn, found["voucher_id"], provider, field=None)
    attempt.city = voucher.city
    redemption = await conn.fetchrow(LOCK_REDEMPTION_SQL, redemption_id)
    assert redemption is not None
    domain.check_refund_within_redeemed(redemption_id, body.amount, redemption["amount"], redemption["refunded"])

    refunded = await conn.fetchrow(REFUND_REDEMPTION_SQL, redemption_id, body.amount)
    assert refunded is not None and refunded["refunded"] == redemption["refunded"] + body.amount
    destination = domain.refund_destination(voucher)
    to_balance = body.amount if destination == "voucher" else 0
    to_budget = body.amount if destination == "budget" else 0
    to_expiry = body.amount if destination in ("lapsed", "carried") else 0
    after = _after(voucher, await conn.fetchrow(REFUND_VOUCHER_SQL, voucher.voucher_id, body.amount, to_balance,
                                                to_budget, to_expiry))
    assert after.refunded == voucher.refunded + body.amount
    refund_id = str(uuid.uuid4())
    await conn.execute(INSERT_REFUND_SQL, refund_id, redemption_id, voucher.voucher_id, provider, body.amount,
                       destination, now)
    events = [_event(topic, voucher.voucher_id, ev.RedemptionRefunded, ev.RedemptionRefundedData(
        refund_id=refund_id, redemption_id=redemption_id, voucher_id=voucher.voucher_id, city=voucher.city,
        year=voucher.year, provider=provider, amount=body.amount), actor, now)]
    if to_budget:
        events.append(_event(topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
            voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=to_budget,
            refund_id=refund_id), actor, now))
    if to_expiry:
        assert voucher.disposition is not None
        events.append(_event(topic, voucher.voucher_id, ev.VoucherExpired, ev.VoucherExpiredData(
            voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, amount=to_expiry,
            disposition=voucher.disposition, refund_id=refund_id), actor, now))  # type: ignore[arg-type]
    await outbox.append(conn, events)
    attempt.refund = Refund(refund_id=refund_id, redemption_id=redemption_id, voucher_id=voucher.voucher_id,
                            provider=provider, amount=body.amount, refunded=refunded["refunded"],
                            refundable=refunded["amount"] - refunded["refunded"],
                            returned_to=destination, created_at=now)  # type: ignore[arg-type]
    return attempt.refund


# --- the sweepers' transactions --------------------------------------------------------------------------------------

@dataclass
class Swept:
    holds: list[tuple[str, int]] = dataclasses.field(default_factory=list)                 # (city, amount)
    vouchers: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)         # (city, disposition, amount)
    candidates: int = 0


async def void_timed_out_holds(conn: asyncpg.Connection, *, topic: str, now: dt.datetime, limit: int) -> Swept:
    """Void every active hold past its expires_at, for up to `limit` vouchers, in the caller's transaction.

    A voucher another transaction holds (a capture racing the timeout, say) is skipped: that transaction sees the
    hold expired and refuses, and the next round voids it. So exactly one of them settles the hold.
    """
    assert conn.is_in_transaction()
    swept = Swept()
    due = [r[0] for r in await conn.fetch(DUE_HOLD_VOUCHERS_SQL, now, limit)]
    if not due:
        return swept
    out: list = []
    locked = await conn.fetch(LOCK_VOUCHERS_SKIP_LOCKED_SQL, due)
    swept.candidates = len(locked)  # a full batch only when every due voucher could be taken
    for row in locked:
        voucher = voucher_state(row)
        holds = await conn.fetch(LOCK_TIMED_OUT_HOLDS_SQL, voucher.voucher_id, now)
        await _void_holds(conn, voucher, holds, status="expired", reason="expired", topic=topic, now=now,
                          actor=ACTOR_HOLD_SWEEPER, out=out)
        swept.holds.extend((voucher.city, h["amount"]) for h in holds)
    await outbox.append(conn, out)
    return swept


async def expire_vouchers(conn: asyncpg.Connection, *, topic: str, now: dt.datetime, limit: int) -> Swept:
    """Expire up to `limit` active vouchers past expires_at with no open hold, in the caller's transaction: the
    unspent balance leaves as VoucherExpired, to lapse or carry by the budget's year-end policy."""
    assert conn.is_in_transaction()
    swept = Swept()
    rows = await conn.fetch(LOCK_DUE_VOUCHERS_SQL, now, limit)
    swept.candidates = len(rows)
    if not rows:
        return swept
    vouchers = [voucher_state(r) for r in rows]
    dispositions = [domain.expiry_disposition(v, r["budget_policy"]) for v, r in zip(vouchers, rows)]
    for v in vouchers:
        assert domain.is_due_to_expire(v, now), v
    expired = {r["voucher_id"]: r for r in await conn.fetch(
        EXPIRE_VOUCHERS_SQL, [v.voucher_id for v in vouchers], dispositions, now)}
    assert len(expired) == len(vouchers), "a locked due voucher refused to expire"
    out = []
    for v, disposition in zip(vouchers, dispositions):
        after = _after(v, expired[v.voucher_id])
        assert after.balance == 0 and after.expired == v.expired + v.balance
        out.append(_event(topic, v.voucher_id, ev.VoucherExpired, ev.VoucherExpiredData(
            voucher_id=v.voucher_id, city=v.city, year=v.year, amount=v.balance,
            disposition=disposition), ACTOR_EXPIRY_SWEEPER, now))  # type: ignore[arg-type]
        swept.vouchers.append((v.city, disposition, v.balance))
    await outbox.append(conn, out)
    return swept


# --- statements ------------------------------------------------------------------------------------------------------

async def statement(conn: asyncpg.Connection, provider: str, start: dt.datetime | None, end: dt.datetime | None,
                    city: str | None) -> Statement:
    """A provider's redemptions (captures included) and refunds in [start, end), with totals, from one snapshot.

    Each line's created_at is its event's occurred_at, so the totals equal the movements of the ledger's
    provider:{provider} account over entries whose occurred_at is in the same period.
    """
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        args = (provider, start, end, city)
        totals = await conn.fetchrow(STATEMENT_TOTALS_SQL, *args)
        redemptions = await conn.fetch(STATEMENT_REDEMPTIONS_SQL, *args, STATEMENT_LINES_MAX)
        refunds = await conn.fetch(STATEMENT_REFUNDS_SQL, *args, STATEMENT_LINES_MAX)
    lines = [StatementRedemption(redemption_id=r["redemption_id"], voucher_id=r["voucher_id"], city=r["city"],
                                 year=r["year"], amount=r["amount"], hold_id=r["hold_id"],
                                 invoice=_invoice(r["invoice_number"], r["invoice_amount"]),
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
