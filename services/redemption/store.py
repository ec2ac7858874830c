"""Redemption SQL: named, parameterised statements, the issuing-event handler and the redeem transaction."""
from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Final

import asyncpg

from schemas import events as ev
from schemas.redemption import Redemption, RedemptionIn, VoucherView

from services.common import outbox
from services.common.consumer import Delivered
from services.common.errors import InvoiceAlreadySubsidised, NotFound

from . import domain

# Provider ids and city ids match ^[a-z0-9][a-z0-9-]{0,62}$, so a comma-joined string round-trips a list through
# unnest (asyncpg cannot pass a ragged text[][]); the statements below split on the same ','.
LIST_SEPARATOR: Final = ","

# --- from the issuing topic ------------------------------------------------------------------------------------------

INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp, providers,
                      expires_at, minted_at)
SELECT v.id, v.city, v.year, v.beneficiary, v.kind, v.amount, v.amount, v.ratio,
       string_to_array(v.providers, ','), v.expires_at, v.minted_at
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::int[], $8::text[],
            $9::timestamptz[], $10::timestamptz[])
     AS v(id, city, year, beneficiary, kind, amount, ratio, providers, expires_at, minted_at)
ON CONFLICT (voucher_id) DO NOTHING"""
UPSERT_PROVIDERS_SQL: Final = """
INSERT INTO providers AS p (provider, name, cities, set_at)
SELECT k.provider, k.name, string_to_array(k.cities, ','), k.set_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS k(provider, name, cities, set_at)
ON CONFLICT (provider) DO UPDATE SET name = EXCLUDED.name, cities = EXCLUDED.cities, set_at = EXCLUDED.set_at
    WHERE p.set_at <= EXCLUDED.set_at"""

# --- vouchers and redemptions --------------------------------------------------------------------------------------

_VOUCHER_COLUMNS: Final = """
SELECT v.voucher_id::text, v.city, v.year, v.amount, v.balance, v.held, v.redeemed, v.refunded, v.subsidy_ratio_bp,
       v.providers, v.expires_at, v.status,
       (SELECT p.cities FROM providers p WHERE p.provider = $2) AS provider_cities
FROM vouchers v WHERE v.voucher_id = $1"""
# $2: the provider asking (NULL for an admin); provider_cities is NULL when it is not whitelisted anywhere.
GET_VOUCHER_SQL: Final = _VOUCHER_COLUMNS
LOCK_VOUCHER_SQL: Final = _VOUCHER_COLUMNS + "\nFOR UPDATE OF v"
CLAIM_INVOICE_SQL: Final = """
INSERT INTO subsidised_invoices (provider, invoice_number, invoice_amount, voucher_id, created_at)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (provider, invoice_number) DO NOTHING
RETURNING true"""
# The final arbiter: a voucher is only ever debited within its balance.
DEBIT_VOUCHER_SQL: Final = """
UPDATE vouchers SET balance = balance - $2, redeemed = redeemed + $2
WHERE voucher_id = $1 AND balance >= $2
RETURNING amount, balance, held, redeemed, refunded"""
INSERT_REDEMPTION_SQL: Final = """
INSERT INTO redemptions (redemption_id, voucher_id, provider, amount, invoice_number, invoice_amount, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""


def voucher_state(row: asyncpg.Record) -> domain.VoucherState:
    v = domain.VoucherState(
        voucher_id=row["voucher_id"], city=row["city"], year=row["year"], amount=row["amount"],
        balance=row["balance"], held=row["held"], redeemed=row["redeemed"], refunded=row["refunded"],
        subsidy_ratio_bp=row["subsidy_ratio_bp"], providers=row["providers"], expires_at=row["expires_at"],
        status=row["status"])
    domain.assert_value_conserved(v)
    return v


def voucher_view(v: domain.VoucherState, now: dt.datetime) -> VoucherView:
    return VoucherView(voucher_id=v.voucher_id, city=v.city, amount=v.amount, balance=v.balance, held=v.held,
                       expires_at=v.expires_at, status=domain.status_at(v, now))


def _joined(ids: list[str] | None) -> str | None:
    if ids is None:
        return None
    assert all(LIST_SEPARATOR not in i for i in ids)
    return LIST_SEPARATOR.join(ids)


async def apply_issuing_events(conn: asyncpg.Connection, delivered: list[Delivered]) -> None:
    """Consumer handler (in the batch's transaction, fresh events only): vouchers minted and whitelists set.

    Written as one multi-row statement per kind, in key order so that concurrent writers lock rows in one order.
    Other issuing events are not needed here yet.
    """
    assert conn.is_in_transaction()
    minted: dict[str, ev.VoucherMintedData] = {}
    whitelists: dict[str, ev.ProviderSet] = {}
    for d in delivered:
        match d.event:
            case ev.VoucherMinted(data=data):
                minted.setdefault(data.voucher_id, data)
            case ev.ProviderSet(data=data) as event:
                # Same key, same partition: delivery order is publication order; occurred_at decides otherwise.
                latest = whitelists.get(data.provider)
                if latest is None or latest.occurred_at <= event.occurred_at:
                    whitelists[data.provider] = event
            case _:
                pass
    if minted:
        rows = [minted[k] for k in sorted(minted)]
        await conn.execute(
            INSERT_VOUCHERS_SQL, [m.voucher_id for m in rows], [m.city for m in rows], [m.year for m in rows],
            [m.beneficiary for m in rows], [m.kind for m in rows], [m.amount for m in rows],
            [m.subsidy_ratio_bp for m in rows], [_joined(m.providers) for m in rows], [m.expires_at for m in rows],
            [m.created_at for m in rows])
    if whitelists:
        sets = [whitelists[k] for k in sorted(whitelists)]
        await conn.execute(
            UPSERT_PROVIDERS_SQL, [s.data.provider for s in sets], [s.data.name for s in sets],
            [_joined(s.data.cities) for s in sets], [s.occurred_at for s in sets])


@dataclass
class RedeemAttempt:
    """What the HTTP edge needs for its metrics, filled in as the command runs."""

    city: str | None = None
    redemption: Redemption | None = None


async def redeem(conn: asyncpg.Connection, body: RedemptionIn, *, provider: str, actor: str, topic: str,
                 now: dt.datetime, attempt: RedeemAttempt) -> Redemption:
    """Debit a voucher for a provider in the caller's transaction, or raise the refusal (nothing is written then).

    The voucher's row lock serialises redemptions of one voucher; the conditional debit and the table's CHECKs
    keep the balance whole even if that lock were ever missed.
    """
    assert conn.is_in_transaction()
    row = await conn.fetchrow(LOCK_VOUCHER_SQL, body.voucher_id, provider)
    if row is None:
        raise NotFound(f"no voucher {body.voucher_id} (a new voucher is redeemable once its mint event is consumed)",
                       field="voucher_id")
    voucher = voucher_state(row)
    attempt.city = voucher.city
    domain.check_redeemable(voucher, provider, row["provider_cities"], body.amount, body.invoice, now)
    invoice = body.invoice
    if invoice is not None and not await conn.fetchval(CLAIM_INVOICE_SQL, provider, invoice.number, invoice.amount,
                                                       voucher.voucher_id, now):
        raise InvoiceAlreadySubsidised(f"invoice {invoice.number} of {provider} has already been subsidised",
                                       field="invoice.number")
    domain.check_sufficient_balance(voucher, body.amount)

    debited = await conn.fetchrow(DEBIT_VOUCHER_SQL, voucher.voucher_id, body.amount)
    assert debited is not None, "the locked voucher refused a debit within its balance"
    after = dataclasses.replace(voucher, **dict(debited))
    domain.assert_value_conserved(after)
    assert after.balance == voucher.balance - body.amount

    redemption_id = str(uuid.uuid4())
    await conn.execute(INSERT_REDEMPTION_SQL, redemption_id, voucher.voucher_id, provider, body.amount,
                       invoice.number if invoice else None, invoice.amount if invoice else None, now)
    data = ev.VoucherRedeemedData(redemption_id=redemption_id, voucher_id=voucher.voucher_id, city=voucher.city,
                                  year=voucher.year, provider=provider, amount=body.amount, balance=after.balance,
                                  invoice=invoice)
    await outbox.append(conn, [(topic, voucher.voucher_id, outbox.envelope(
        ev.VoucherRedeemed, data, producer="redemption", actor=actor, occurred_at=now))])
    attempt.redemption = Redemption(redemption_id=redemption_id, voucher_id=voucher.voucher_id, provider=provider,
                                    amount=body.amount, balance=after.balance)
    return attempt.redemption
