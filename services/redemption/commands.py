"""Redemption commands: one function per command and per consumed event, and the reads the edge serves.

Each command locks what it changes, runs the rules of `domain.py` in their documented order, writes, appends its
events to the outbox in the same transaction, and returns its result. No HTTP here: the edge parses, authorises,
calls one function and answers.

Lock order, everywhere: the voucher row first, then its holds or redemptions. So a capture, a void, a refund, the
hold timeout sweeper, the expiry sweeper and a revocation's freeze are serialised per voucher; each sees the others'
committed effects, and a hold is settled exactly once. The sweepers lock vouchers with SKIP LOCKED (never wait),
and the consumer locks several vouchers in id order, so no two transactions wait on each other in a cycle.

A redemption joins the process's writer batch (writer.py, `write_redemptions`: many redemptions, one transaction,
each decided alone; its vouchers locked in id order with one statement, after the batch's idempotency keys and before
its invoice claims). Holds, captures, voids and refunds run alone, through `idempotency.run` (one transaction,
Idempotency-Key honoured). Metrics are counted once a command committed, and not at all for a replayed answer
(nothing changed then). The consumer handler runs in the consumer's transaction; each sweeper step is one
transaction of its own.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import asyncpg
import msgspec
from prometheus_client import Counter

from schemas import events as ev
from schemas.events import Invoice
from schemas.limits import IDEMPOTENCY_CONCURRENT_ATTEMPTS_MAX, STATEMENT_LINES_MAX, SWEEP_BATCH_MAX
from schemas.redemption import (
    CaptureIn, Hold, HoldIn, Redemption, RedemptionDetail, RedemptionIn, Refund, RefundIn, Statement, VoucherView,
)

from services.common import idempotency, metrics, outbox
from services.common.ids import uuid7, uuid7s
from services.common.consumer import Delivered
from services.common.errors import IdempotencyKeyReused, NotFound, ServiceError, ValidationFailed
from services.common.group_commit import ABANDONED, TAKEN, WRITING, Command

from . import domain, rule_metrics, store
from .store import (
    ATTACH_INVOICE_SQL, CAPTURE_HOLD_SQL, CLAIM_INVOICE_SQL, CLAIM_INVOICES_SQL, COUNT_OPEN_HOLDS_SQL,
    DUE_HOLD_VOUCHERS_SQL, EXPIRE_VOUCHERS_SQL, FREEZE_SQL, GET_HOLD_SQL, GET_REDEMPTION_SQL,
    GET_VOUCHER_SQL, HOLD_VOUCHER_SQL, INSERT_HOLD_SQL, INSERT_REDEMPTION_SQL,
    INSERT_REFUND_SQL, INSERT_VOUCHERS_SQL, LOCK_DUE_VOUCHERS_SQL, LOCK_HOLD_SQL, LOCK_OPEN_HOLDS_SQL,
    LOCK_REDEMPTION_SQL, LOCK_SPEND_VOUCHERS_SQL, LOCK_TIMED_OUT_HOLDS_SQL, LOCK_VOUCHER_SQL,
    LOCK_VOUCHERS_SKIP_LOCKED_SQL, LOCK_VOUCHERS_SQL, PARK_REVOCATION_SQL, REASSIGN_INVOICES_SQL,
    REFUND_REDEMPTION_SQL, REFUND_VOUCHER_SQL, RELEASE_INVOICES_SQL, RESERVE_SQL, SETTLE_HELD_SQL,
    STATEMENT_REDEMPTIONS_SQL, STATEMENT_REFUNDS_SQL, STATEMENT_TOTALS_SQL, TAKE_EARLY_REVOCATIONS_SQL,
    TAKE_SETTLEABLE_REVOCATIONS_SQL, UNCLAIM_INVOICES_SQL,
    UPSERT_POLICIES_SQL, UPSERT_PROVIDERS_SQL, VOID_HOLDS_SQL, WRITE_REDEMPTIONS_SQL,
)

log = logging.getLogger("cvl.redemption.commands")

PRODUCER: Final = "redemption"
ACTOR_HOLD_SWEEPER: Final = "system:hold-sweeper"
ACTOR_EXPIRY_SWEEPER: Final = "system:expiry-sweeper"
CITY_UNKNOWN: Final = "unknown"  # metrics label when a refusal came before the voucher was found


@dataclass(frozen=True)
class Service:
    """What every command needs from its process: the pool, the topic its events go to, the relay to wake once
    they are committed, and the process's redemption writer (`writer.Redemptions.submit`; without one, as in
    tests that call the commands directly, a redemption is written in a transaction of its own)."""

    pool: asyncpg.Pool
    topic: str
    wake_relay: Callable[[], None]
    submit: Callable[[RedeemCommand], Awaitable[RedeemCommand]] | None = None


def _event(topic: str, key: str, cls: type[ev.Envelope], data: Any, actor: str, now: dt.datetime):
    return topic, key, outbox.envelope(cls, data, producer=PRODUCER, actor=actor, occurred_at=now)


# --- running a request's command alone -------------------------------------------------------------------------------

@dataclass
class _Effect:
    """What a command did, filled in as it runs: its city once known (for a refusal's metrics too), then what it
    wrote (for the metrics counted after the commit)."""

    city: str = CITY_UNKNOWN
    outcome: str | None = None   # placed | captured | voided (holds), where a refund went, ok (redemptions)
    amount: int = 0              # placed, captured, redeemed or refunded
    released: int = 0            # of a hold, back to the balance


async def _alone(svc: Service, key: idempotency.Key | None, status: int, effect: _Effect,
                 transaction: Callable[[asyncpg.Connection], Awaitable[Any]], refusals: Counter,
                 count: Callable[[_Effect], None]) -> idempotency.Answer:
    """Run one command in its own transaction, Idempotency-Key honoured; count a refusal by its code, or what
    committed; wake the relay for the committed events. A replayed answer changed nothing now: nothing is counted."""
    async def command(conn: asyncpg.Connection) -> tuple[int, Any]:
        return status, await transaction(conn)

    try:
        answer = await idempotency.run(svc.pool, key, command)
    except IdempotencyKeyReused:
        raise  # about the key, not the rules: the command never ran
    except ServiceError as refusal:
        refusals.labels(effect.city, refusal.code).inc()
        raise
    if not answer.replayed:
        assert effect.outcome is not None, "a committed command says what it did"
        count(effect)
        svc.wake_relay()
    return answer


def _count_redemption(effect: _Effect) -> None:
    metrics.redemptions.labels(effect.city, "ok").inc()
    metrics.amount_redeemed.labels(effect.city).inc(effect.amount)


def _count_hold(effect: _Effect) -> None:
    assert effect.outcome is not None
    rule_metrics.holds.labels(effect.city, effect.outcome).inc()
    if effect.amount:
        rule_metrics.hold_amount.labels(effect.city, "placed" if effect.outcome == "placed" else "captured").inc(
            effect.amount)
    if effect.released:
        rule_metrics.hold_amount.labels(effect.city, "released").inc(effect.released)


def _count_capture(effect: _Effect) -> None:
    _count_hold(effect)
    _count_redemption(effect)  # a capture is a redemption


def _count_refund(effect: _Effect) -> None:
    assert effect.outcome is not None
    rule_metrics.refunds.labels(effect.city, effect.outcome).inc()
    rule_metrics.amount_refunded.labels(effect.city).inc(effect.amount)


# --- locks and the one spending check --------------------------------------------------------------------------------

async def _lock_voucher(conn: asyncpg.Connection, voucher_id: str, provider: str | None,
                        field: str | None = "voucher_id") -> tuple[domain.VoucherState, asyncpg.Record]:
    """The voucher, locked, with the asking provider's whitelisted cities (`provider_cities`)."""
    row = await conn.fetchrow(LOCK_VOUCHER_SQL, voucher_id, provider)
    if row is None:
        raise NotFound(f"no voucher {voucher_id} (a new voucher is redeemable once its mint event is consumed)",
                       field=field)
    return store.voucher_state(row), row


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


async def _authorise_spend(conn: asyncpg.Connection, voucher_id: str, amount: int, invoice: Invoice | None, *,
                           provider: str, now: dt.datetime, holding: bool, effect: _Effect) -> domain.VoucherState:
    """Lock the voucher, gather what the spending rules need, and run them (`domain.check_spend`): the one check
    sequence of a hold and a redemption (which runs it in its writer batch, `write_redemptions`). A refusal raises and the caller's transaction rolls back, the invoice's
    claim with it.

    The invoice is claimed before the checks run: its unique row is what decides between concurrent spends of one
    invoice (the loser waits for the winner's commit, then finds the row), and the claim is rolled back with any
    refusal, so claiming early changes nothing a refused spend leaves behind.
    """
    assert conn.is_in_transaction()
    voucher, row = await _lock_voucher(conn, voucher_id, provider)
    effect.city = voucher.city
    claimed = invoice is None or bool(await conn.fetchval(
        CLAIM_INVOICE_SQL, provider, invoice.number, invoice.amount, voucher.voucher_id, now))
    open_holds = await conn.fetchval(COUNT_OPEN_HOLDS_SQL, voucher.voucher_id) if holding else None
    domain.check_spend(voucher, provider=provider, whitelisted_cities=row["provider_cities"], amount=amount,
                       invoice=invoice, invoice_claimed=claimed, now=now, open_holds=open_holds)
    return voucher


# --- redeem: commands queue for the process's redemption writer (writer.py), which runs `write_redemptions` ------

_encoder: Final = msgspec.json.Encoder()


@dataclass
class RedeemCommand(Command):
    """One POST /v1/redemptions on its way through the writer: the request, then what the batch decided."""

    body: RedemptionIn
    provider: str
    actor: str
    key: idempotency.Key | None
    now: dt.datetime
    city: str = CITY_UNKNOWN     # metrics label, once the voucher was found
    redemption: Redemption | None = None
    answer: bytes = b""          # the 201 body of an accepted command
    refusal: ServiceError | None = None
    replay: bool = False         # the key was already used: answer with the stored response


class RedeemOutcome(NamedTuple):
    accepted: int
    refused: int
    dropped: int  # abandoned by their callers before anything was decided


async def redeem(svc: Service, key: idempotency.Key | None, body: RedemptionIn, *, provider: str, actor: str,
                 now: dt.datetime) -> idempotency.Answer:
    """Debit a voucher for a provider now (201 Redemption), or raise the refusal (nothing is written then).

    The command joins the process's writer batch (one transaction for many redemptions, DESIGN.md "The hot
    account"); it is decided alone, in arrival order, with the one check sequence. A key used before is answered
    with its stored response (the key's claim in the batch finds it).
    """
    for _attempt in range(IDEMPOTENCY_CONCURRENT_ATTEMPTS_MAX):
        command = RedeemCommand(body=body, provider=provider, actor=actor, key=key, now=now)
        command = await (svc.submit(command) if svc.submit is not None else _redeem_alone(svc, command))
        if command.refusal is not None:
            raise command.refusal
        if not command.replay:
            return idempotency.Answer(201, command.answer)
        assert key is not None
        if (stored := await idempotency.lookup(svc.pool, key)) is not None:
            return stored
        # The key's first use was refused (or abandoned) and released meanwhile: run this one for real.
    raise ValidationFailed("the Idempotency-Key is being used by concurrent requests", field=idempotency.HEADER)


async def _redeem_alone(svc: Service, command: RedeemCommand) -> RedeemCommand:
    """A redemption in a transaction of its own (a Service without a writer)."""
    command.state = TAKEN
    outcome = await commit_redemptions(svc.pool, [command], topic=svc.topic)
    if outcome.accepted:
        svc.wake_relay()
    return command


async def commit_redemptions(pool: asyncpg.Pool, commands: list[RedeemCommand], *, topic: str) -> RedeemOutcome:
    """Write a batch in one transaction; once it committed, count what it did (a replay or a dropped command
    changed nothing: it is not counted)."""
    async with pool.acquire() as conn, conn.transaction():
        outcome = await write_redemptions(conn, commands, topic=topic)
    refused: Tally[tuple[str, str]] = Tally()
    redeemed: dict[str, list[int]] = {}
    for c in commands:
        if c.replay or c.state == ABANDONED:
            continue
        if c.refusal is not None:
            refused[(c.city, c.refusal.code)] += 1
        else:
            counts = redeemed.setdefault(c.city, [0, 0])
            counts[0] += 1
            counts[1] += c.body.amount
    for (city, code), n in refused.items():
        metrics.redemptions.labels(city, code).inc(n)
    for city, (n, amount) in redeemed.items():
        metrics.redemptions.labels(city, "ok").inc(n)
        metrics.amount_redeemed.labels(city).inc(amount)
    return outcome


async def write_redemptions(conn: asyncpg.Connection, commands: list[RedeemCommand], *,
                            topic: str) -> RedeemOutcome:
    """Decide and write a writer's batch in the caller's transaction, one statement per step for the whole batch.

    Lock order, as everywhere here: idempotency keys (sorted), the vouchers (sorted, one statement), then invoice
    claims (sorted). Commands whose callers went during the lock wait are dropped; the rest are decided alone, in
    arrival order, with `domain.check_spend` against the voucher as the earlier commands of the batch left it (a
    refusal refuses only its command), and written: debits, redemptions, their events, stored answers.

    Invoices are claimed before the checks run, as for a hold (the unique row decides between concurrent spends);
    a claim is held by the first accepted spend of its invoice in the batch, and one no accepted spend holds is
    given up before the commit.
    """
    assert conn.is_in_transaction()
    assert all(c.state in (TAKEN, ABANDONED) for c in commands)
    # A key is claimed once per batch, with the request of its first command; its later commands with the same
    # request are retries, decided in turn (a retry of a refused command runs again, as it would after the refusal
    # rolled back; a retry of an accepted one replays its answer).
    claimers: dict[tuple[str, str], RedeemCommand] = {}
    for c in commands:
        if c.key is not None:
            claimers.setdefault((c.key.principal, c.key.key), c)
    claimed: set[tuple[str, str]] = set()
    if claimers:
        claimed = await idempotency.claim_many(conn, [c.key for c in claimers.values()])  # type: ignore[misc]
    for c in commands:
        if c.key is not None:
            k = (c.key.principal, c.key.key)
            # Used before (answered from its stored response), or with another request in this batch (found out
            # once this batch committed).
            c.replay = k not in claimed or c.key.request_hash != claimers[k].key.request_hash  # type: ignore
    live = [c for c in commands if not c.replay]
    pairs = sorted({(c.body.voucher_id, c.provider) for c in live})
    rows = await conn.fetch(LOCK_SPEND_VOUCHERS_SQL, [v for v, _ in pairs], [p for _, p in pairs]) if pairs else []
    # The lock wait is where a batch spends its time. A caller that went meanwhile was told 503: its command is
    # dropped here, before anything is decided; from here on, a caller that goes waits for the commit instead.
    gone = [c for c in live if c.state == ABANDONED]
    live = [c for c in live if c.state != ABANDONED]
    for c in live:
        c.state = WRITING
    vouchers: dict[str, domain.VoucherState] = {}  # as locked
    whitelists: dict[str, list[str] | None] = {}
    for r in rows:
        if r["voucher_id"] not in vouchers:
            vouchers[r["voucher_id"]] = store.voucher_state(r)
        whitelists[r["provider"]] = r["provider_cities"]

    # Invoice claims: one per (provider, number) the batch spends on a voucher that exists, for its first spender.
    first: dict[tuple[str, str], RedeemCommand] = {}
    for c in live:
        if c.body.invoice is not None and c.body.voucher_id in vouchers:
            first.setdefault((c.provider, c.body.invoice.number), c)
    claimed_invoices: set[tuple[str, str]] = set()
    if first:
        claimed_invoices = {(r["provider"], r["invoice_number"]) for r in await conn.fetch(
            CLAIM_INVOICES_SQL, *_invoice_columns(first))}

    holder: dict[tuple[str, str], RedeemCommand] = {}  # invoice → the accepted spend that holds its claim
    accepted: list[tuple[RedeemCommand, domain.VoucherState, int]] = []  # (command, voucher, balance after it)
    spent: dict[str, int] = {}  # voucher → what the batch's accepted commands debit of it so far
    answered: set[tuple[str, str]] = set()  # keys of the accepted commands
    refused = 0
    for c in live:
        if c.key is not None and (c.key.principal, c.key.key) in answered:
            c.replay = True  # a retry of a command accepted earlier in this batch: it replays that answer
            continue
        voucher_id = c.body.voucher_id
        voucher = vouchers.get(voucher_id)
        if voucher is None:
            c.refusal = NotFound(f"no voucher {voucher_id} (a new voucher is redeemable once its mint event "
                                 "is consumed)", field="voucher_id")
            refused += 1
            continue
        c.city = voucher.city
        if voucher_id in spent:  # debited by an earlier command of the batch: decided against what that left
            voucher = domain.debited(voucher, spent[voucher_id])
        invoice = c.body.invoice
        ikey = None if invoice is None else (c.provider, invoice.number)
        amount = c.body.amount
        try:
            domain.check_spend(voucher, provider=c.provider, whitelisted_cities=whitelists.get(c.provider),
                               amount=amount, invoice=invoice,
                               invoice_claimed=ikey is None or (ikey in claimed_invoices and ikey not in holder),
                               now=c.now)
        except ServiceError as refusal:
            c.refusal = refusal.with_traceback(None)  # kept without this frame: no cycle through the batch
            refused += 1
            continue
        spent[voucher_id] = spent.get(voucher_id, 0) + amount
        if ikey is not None:
            holder[ikey] = c
        accepted.append((c, voucher, voucher.balance - amount))
        if c.key is not None:
            answered.add((c.key.principal, c.key.key))

    moved = {k: c for k, c in holder.items() if first[k] is not c}
    if moved:
        await conn.execute(REASSIGN_INVOICES_SQL, *_invoice_columns(moved))
    unheld = sorted(claimed_invoices - holder.keys())
    if unheld:
        await conn.execute(UNCLAIM_INVOICES_SQL, [p for p, _ in unheld], [n for _, n in unheld])
    if accepted:
        await _write_debits(conn, accepted, vouchers, spent, topic)
        done = [c for c, _, _ in accepted if c.key is not None]
        if done:
            await idempotency.complete_many(conn, [(c.key, 201, c.answer) for c in done])  # type: ignore[misc]
    # Refused and dropped commands change nothing, their keys included: release them so that a retry runs again.
    released = [claimers[k].key for k in sorted(claimed - answered)]
    if released:
        await idempotency.release_many(conn, released)  # type: ignore[arg-type]
    return RedeemOutcome(len(accepted), refused, len(gone))


def _invoice_columns(claims: dict[tuple[str, str], RedeemCommand]) -> list[list]:
    """Invoice claims as the parallel arrays of CLAIM_INVOICES_SQL and REASSIGN_INVOICES_SQL."""
    columns: list[list] = [[], [], [], [], []]
    for (provider, number), c in claims.items():
        assert c.body.invoice is not None
        for column, value in zip(columns, (provider, number, c.body.invoice.amount, c.body.voucher_id, c.now)):
            column.append(value)
    return columns


_REDEEMED_TYPE: Final = outbox.row_type(ev.VoucherRedeemed)


async def _write_debits(conn: asyncpg.Connection, accepted: list[tuple[RedeemCommand, domain.VoucherState, int]],
                        locked: dict[str, domain.VoucherState], spent: dict[str, int], topic: str) -> None:
    """The accepted commands' answers, then their debits (one conditional UPDATE per voucher, for its total),
    redemption rows and VoucherRedeemed events, written by ONE statement (store.WRITE_REDEMPTIONS_SQL)."""
    n = len(accepted)
    ids = uuid7s(2 * n)  # the redemptions' ids, then their events'
    redemption_ids, voucher_ids, providers, amounts, numbers, invoice_amounts, created = (
        ids[:n], [], [], [], [], [], [])
    payloads = []
    encode = _encoder.encode
    for i, (c, voucher, balance) in enumerate(accepted):
        invoice, amount, provider, now = c.body.invoice, c.body.amount, c.provider, c.now
        c.redemption = redemption = Redemption(redemption_id=ids[i], voucher_id=voucher.voucher_id,
                                               provider=provider, amount=amount, balance=balance)
        c.answer = encode(redemption)
        voucher_ids.append(voucher.voucher_id)
        providers.append(provider)
        amounts.append(amount)
        numbers.append(invoice.number if invoice else None)
        invoice_amounts.append(invoice.amount if invoice else None)
        created.append(now)
        payloads.append(encode(outbox.envelope(ev.VoucherRedeemed, ev.VoucherRedeemedData(
            redemption_id=ids[i], voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year,
            provider=provider, amount=amount, balance=balance, invoice=invoice, program=voucher.program),
            producer=PRODUCER, actor=c.actor, occurred_at=now, event_id=ids[n + i], request_id=c.request_id)))
    debits = sorted(spent)
    written = await conn.fetch(WRITE_REDEMPTIONS_SQL, debits, [spent[v] for v in debits], redemption_ids,
                               voucher_ids, providers, amounts, numbers, invoice_amounts, created, topic,
                               _REDEEMED_TYPE, ids[n:], payloads)
    assert len(written) == len(debits), "a locked voucher refused a debit its checks allowed"
    for voucher_id, balance, redeemed in written:
        v, debit = locked[voucher_id], spent[voucher_id]
        assert (balance, redeemed) == (v.balance - debit, v.redeemed + debit), \
            f"voucher {voucher_id}: written balance {balance}, redeemed {redeemed}; decided otherwise"


# --- holds -----------------------------------------------------------------------------------------------------------

async def place_hold(svc: Service, key: idempotency.Key | None, body: HoldIn, *, provider: str, actor: str,
                     now: dt.datetime) -> idempotency.Answer:
    """Reserve part of a voucher for a provider until it captures or voids the hold, or the hold times out
    (201 Hold).

    The same rules as a redemption apply now (one check sequence): a capture later takes at most the held amount,
    so it stays within them.
    """
    effect = _Effect()

    async def transaction(conn: asyncpg.Connection) -> Hold:
        voucher = await _authorise_spend(conn, body.voucher_id, body.amount, body.invoice, provider=provider,
                                         now=now, holding=True, effect=effect)
        after = store.voucher_after(voucher, await conn.fetchrow(RESERVE_SQL, voucher.voucher_id, body.amount))
        assert after.held == voucher.held + body.amount
        invoice = body.invoice
        hold_id = uuid7()
        expires_at = now + dt.timedelta(seconds=body.timeout_s)
        hold = await conn.fetchrow(INSERT_HOLD_SQL, hold_id, voucher.voucher_id, provider, body.amount,
                                   invoice.number if invoice else None, invoice.amount if invoice else None,
                                   expires_at, now)
        if invoice is not None:
            assert await conn.fetchval(ATTACH_INVOICE_SQL, provider, invoice.number, hold_id)
        data = ev.HoldPlacedData(hold_id=hold_id, voucher_id=voucher.voucher_id, city=voucher.city,
                                 year=voucher.year, provider=provider, amount=body.amount, expires_at=expires_at,
                                 invoice=invoice, program=voucher.program)
        await outbox.append(conn, [_event(svc.topic, voucher.voucher_id, ev.HoldPlaced, data, actor, now)])
        effect.outcome, effect.amount = "placed", body.amount
        return store.hold_view(hold, now)

    return await _alone(svc, key, 201, effect, transaction, rule_metrics.holds, _count_hold)


async def _lock_active_hold(conn: asyncpg.Connection, hold_id: str, provider: str, now: dt.datetime,
                            effect: _Effect) -> tuple[domain.VoucherState, asyncpg.Record, asyncpg.Record,
                                                      domain.HoldState]:
    """What settling a hold starts with, for a capture and a void alike: lock the voucher and then the hold, and
    refuse unless the caller holds it (403) and it is still active (409 hold_not_active)."""
    voucher, row, hold_row = await _lock_hold(conn, hold_id, provider)
    hold = store.hold_state(hold_row)
    effect.city = voucher.city
    domain.check_hold_owner(hold, provider)
    domain.check_hold_active(hold, now, hold_row["void_reason"])
    return voucher, row, hold_row, hold


async def capture_hold(svc: Service, key: idempotency.Key | None, hold_id: str, body: CaptureIn, *, provider: str,
                       actor: str, now: dt.datetime) -> idempotency.Answer:
    """Capture up to the held amount (all of it when no amount is given); the rest goes back to the balance. The
    capture becomes a redemption (refundable like any other).

    Exactly one of a capture, a void, the timeout and a revocation settles a hold: each locks the voucher and then
    the hold, and acts only on an active hold before its expires_at.
    """
    effect = _Effect()

    async def transaction(conn: asyncpg.Connection) -> Hold:
        voucher, row, hold_row, hold = await _lock_active_hold(conn, hold_id, provider, now, effect)
        assert voucher.status == "active", "a frozen or expired voucher has no active hold"
        domain.check_provider_eligible(voucher, provider, row["provider_cities"])
        amount = hold.amount if body.amount is None else body.amount
        domain.check_within_hold(hold, amount)

        redemption_id = uuid7()
        captured = await conn.fetchrow(CAPTURE_HOLD_SQL, hold_id, amount, redemption_id, now)
        assert captured is not None
        after = store.voucher_after(voucher, await conn.fetchrow(SETTLE_HELD_SQL, voucher.voucher_id, hold.amount,
                                                                 amount))
        assert after.held == voucher.held - hold.amount and after.redeemed == voucher.redeemed + amount
        await conn.execute(INSERT_REDEMPTION_SQL, redemption_id, voucher.voucher_id, provider, amount,
                           hold_row["invoice_number"], hold_row["invoice_amount"], now, hold_id)
        data = ev.HoldCapturedData(hold_id=hold_id, voucher_id=voucher.voucher_id, city=voucher.city,
                                   year=voucher.year, provider=provider, captured=amount,
                                   released=hold.amount - amount, redemption_id=redemption_id,
                                   invoice=store.invoice_of(hold_row["invoice_number"], hold_row["invoice_amount"]),
                                   program=voucher.program)
        await outbox.append(conn, [_event(svc.topic, voucher.voucher_id, ev.HoldCaptured, data, actor, now)])
        effect.outcome, effect.amount, effect.released = "captured", amount, hold.amount - amount
        return store.hold_view(captured, now)

    return await _alone(svc, key, 200, effect, transaction, rule_metrics.holds, _count_capture)


async def void_hold(svc: Service, key: idempotency.Key | None, hold_id: str, *, provider: str, actor: str,
                    now: dt.datetime) -> idempotency.Answer:
    """Release a hold: its whole amount goes back to the voucher's balance (and its invoice is released)."""
    effect = _Effect()

    async def transaction(conn: asyncpg.Connection) -> Hold:
        voucher, _row, hold_row, hold = await _lock_active_hold(conn, hold_id, provider, now, effect)
        out: list = []
        await _void_holds(conn, voucher, [hold_row], status="voided", reason="voided", topic=svc.topic, now=now,
                          actor=actor, out=out)
        await outbox.append(conn, out)
        effect.outcome, effect.released = "voided", hold.amount
        return store.hold_view(await conn.fetchrow(GET_HOLD_SQL, hold_id), now)

    return await _alone(svc, key, 200, effect, transaction, rule_metrics.holds, _count_hold)


async def _void_holds(conn: asyncpg.Connection, voucher: domain.VoucherState, holds: list[asyncpg.Record], *,
                      status: str, reason: str, topic: str, now: dt.datetime, actor: str,
                      out: list) -> domain.VoucherState:
    """Void locked, active holds of a locked voucher: their amounts go back to its balance, their invoices are
    released (nothing was subsidised), and each is announced as HoldVoided (appended to `out`)."""
    if not holds:
        return voucher
    ids = [h["hold_id"] for h in holds]
    voided = await conn.fetch(VOID_HOLDS_SQL, ids, status, reason, now)
    assert len(voided) == len(holds), "a locked active hold refused to be voided"
    await conn.execute(RELEASE_INVOICES_SQL, ids)
    total = sum(h["amount"] for h in holds)
    after = store.voucher_after(voucher, await conn.fetchrow(SETTLE_HELD_SQL, voucher.voucher_id, total, 0))
    assert after.held == voucher.held - total and after.balance == voucher.balance + total
    for h in voided:
        out.append(_event(topic, voucher.voucher_id, ev.HoldVoided, ev.HoldVoidedData(
            hold_id=h["hold_id"], voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year,
            provider=h["provider"], amount=h["amount"], reason=reason,  # type: ignore[arg-type]
            program=voucher.program), actor, now))
    return after


# --- refunds ---------------------------------------------------------------------------------------------------------

async def refund(svc: Service, key: idempotency.Key | None, redemption_id: str, body: RefundIn, *, provider: str,
                 actor: str, now: dt.datetime) -> idempotency.Answer:
    """Return part of a redemption (or of a captured hold) to its voucher; in total at most what it redeemed
    (201 Refund).

    The voucher and then the redemption are locked, so concurrent refunds of one redemption are serialised and
    their total is checked against what is already refunded (and again by the table's CHECK). On a revoked voucher
    the value goes on to the budget at once (VoucherFrozen with refund_id); on an expired one as its year-end
    disposition says (VoucherExpired with refund_id): value never lands on a voucher that can no longer spend it.
    """
    effect = _Effect()

    async def transaction(conn: asyncpg.Connection) -> Refund:
        found = await conn.fetchrow(GET_REDEMPTION_SQL, redemption_id)
        if found is None:
            raise NotFound(f"no redemption {redemption_id}")
        domain.check_refund_owner(found["provider"], redemption_id, provider)
        voucher, _row = await _lock_voucher(conn, found["voucher_id"], provider, field=None)
        effect.city = voucher.city
        redemption = await conn.fetchrow(LOCK_REDEMPTION_SQL, redemption_id)
        assert redemption is not None
        domain.check_refund_within_redeemed(redemption_id, body.amount, redemption["amount"],
                                            redemption["refunded"])

        refunded = await conn.fetchrow(REFUND_REDEMPTION_SQL, redemption_id, body.amount)
        assert refunded is not None and refunded["refunded"] == redemption["refunded"] + body.amount
        route = domain.refund_route(voucher, body.amount)
        after = store.voucher_after(voucher, await conn.fetchrow(
            REFUND_VOUCHER_SQL, voucher.voucher_id, body.amount, route.to_balance, route.to_budget, route.to_expiry))
        assert after.refunded == voucher.refunded + body.amount
        refund_id = uuid7()
        await conn.execute(INSERT_REFUND_SQL, refund_id, redemption_id, voucher.voucher_id, provider, body.amount,
                           route.returned_to, now)
        events = [_event(svc.topic, voucher.voucher_id, ev.RedemptionRefunded, ev.RedemptionRefundedData(
            refund_id=refund_id, redemption_id=redemption_id, voucher_id=voucher.voucher_id, city=voucher.city,
            year=voucher.year, provider=provider, amount=body.amount, program=voucher.program), actor, now)]
        if route.to_budget:
            events.append(_event(svc.topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
                voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=route.to_budget,
                refund_id=refund_id, program=voucher.program), actor, now))
        if route.to_expiry:
            assert voucher.disposition is not None
            events.append(_event(svc.topic, voucher.voucher_id, ev.VoucherExpired, ev.VoucherExpiredData(
                voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, amount=route.to_expiry,
                disposition=voucher.disposition, refund_id=refund_id,  # type: ignore[arg-type]
                program=voucher.program), actor, now))
        await outbox.append(conn, events)
        effect.outcome, effect.amount = route.returned_to, body.amount
        return Refund(refund_id=refund_id, redemption_id=redemption_id, voucher_id=voucher.voucher_id,
                      provider=provider, amount=body.amount, refunded=refunded["refunded"],
                      refundable=refunded["amount"] - refunded["refunded"],
                      returned_to=route.returned_to, created_at=now)  # type: ignore[arg-type]

    return await _alone(svc, key, 201, effect, transaction, rule_metrics.refunds, _count_refund)


# --- consumed: the issuing topic -------------------------------------------------------------------------------------

# The issuing events `apply_issuing_events` acts on; the consumer neither records nor hands over the others.
ISSUING_EVENTS_APPLIED: Final = (ev.VoucherMinted, ev.VouchersMinted, ev.ProviderSet, ev.BudgetSet, ev.VoucherRevoked)
_revoked_decoder: Final = msgspec.json.Decoder(ev.VoucherRevoked)


@dataclass
class IssuingBatch:
    """What one consumer batch did here (for its metrics and logs)."""

    frozen: list[tuple[str, int]] = dataclasses.field(default_factory=list)        # (city, returned) per voucher
    holds_voided: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (city, amount) per hold
    parked_revocations: list[str] = dataclasses.field(default_factory=list)  # revoked before their mint was seen


async def apply_issuing_events(conn: asyncpg.Connection, delivered: list[Delivered], *, topic: str,
                               now: dt.datetime, wake_relay: Callable[[], None]) -> IssuingBatch:
    """Consumer handler (in the batch's transaction, fresh events only): vouchers minted, whitelists and year-end
    policies set, and revocations, which freeze their voucher here (the saga's middle step).

    Written as one multi-row statement per kind, in key order so that concurrent writers lock rows in one order.
    Mints are written before revocations. A single mint's VoucherRevoked follows its VoucherMinted (same key, same
    partition), possibly in the same batch; a batch-minted voucher's VouchersMinted is keyed by city, so its
    revocation may come first: it is then parked (early_revocations) and applied as soon as the mint is written
    here, or by the sweeper (`settle_early_revocations`) when the mint was written by a concurrent transaction.
    Other issuing events are not needed here (the consumer hands over only ISSUING_EVENTS_APPLIED).
    """
    assert conn.is_in_transaction()
    minted: dict[str, tuple] = {}  # voucher id -> its INSERT_VOUCHERS_SQL columns
    whitelists: dict[str, ev.ProviderSet] = {}
    policies: dict[tuple[str, str, int], ev.BudgetSet] = {}  # by (city, program, year)
    revocations: dict[str, ev.VoucherRevoked] = {}
    for d in delivered:
        match d.event:
            case ev.VoucherMinted(data=m):
                if m.voucher_id not in minted:
                    minted[m.voucher_id] = (m.voucher_id, m.city, m.year, m.beneficiary, m.kind, m.amount,
                                            m.subsidy_ratio_bp, store.joined(m.providers), m.expires_at,
                                            m.created_at, m.year_end, m.program)
            case ev.VouchersMinted(data=b):
                for m in b.vouchers:
                    if m.voucher_id not in minted:
                        minted[m.voucher_id] = (m.voucher_id, b.city, b.year, m.beneficiary, m.kind, m.amount,
                                                m.subsidy_ratio_bp, store.joined(m.providers), m.expires_at,
                                                b.created_at, b.year_end, b.program)
            case ev.ProviderSet(data=data) as event:
                # Same key, same partition: delivery order is publication order; occurred_at decides otherwise.
                latest = whitelists.get(data.provider)
                if latest is None or latest.occurred_at <= event.occurred_at:
                    whitelists[data.provider] = event
            case ev.BudgetSet(data=data) as event:
                budget = (data.city, data.program, data.year)
                latest_budget = policies.get(budget)
                if latest_budget is None or latest_budget.occurred_at <= event.occurred_at:
                    policies[budget] = event
            case ev.VoucherRevoked(data=data) as event:
                revocations.setdefault(data.voucher_id, event)
            case _:
                pass
    if minted:
        ids = sorted(minted)
        await conn.execute(INSERT_VOUCHERS_SQL, *(list(c) for c in zip(*(minted[k] for k in ids))))
        # Revocations that came before these mints: applied now, after the mints, like any other.
        for raw in await conn.fetch(TAKE_EARLY_REVOCATIONS_SQL, ids):
            early = _revoked_decoder.decode(raw["event"])
            revocations.setdefault(early.data.voucher_id, early)
    if whitelists:
        sets = [whitelists[k] for k in sorted(whitelists)]
        await conn.execute(
            UPSERT_PROVIDERS_SQL, [s.data.provider for s in sets], [s.data.name for s in sets],
            [store.joined(s.data.cities) for s in sets], [s.occurred_at for s in sets])
    if policies:
        budgets = [policies[k] for k in sorted(policies)]
        await conn.execute(
            UPSERT_POLICIES_SQL, [b.data.city for b in budgets], [b.data.program for b in budgets],
            [b.data.year for b in budgets], [b.data.year_end for b in budgets], [b.occurred_at for b in budgets])
    batch = IssuingBatch()
    if revocations:
        out: list = []
        await conn.fetch(LOCK_VOUCHERS_SQL, sorted(revocations))
        for voucher_id in sorted(revocations):
            await _freeze(conn, revocations[voucher_id], topic=topic, now=now, out=out, batch=batch)
        await outbox.append(conn, out)
    # Counted before the consumer commits (a batch that then fails is applied and counted again on redelivery).
    for city, returned in batch.frozen:
        rule_metrics.vouchers_frozen.labels(city).inc()
        rule_metrics.amount_frozen.labels(city).inc(returned)
    for city, amount in batch.holds_voided:
        rule_metrics.holds.labels(city, "revoked").inc()
        rule_metrics.hold_amount.labels(city, "released").inc(amount)
    for voucher_id in batch.parked_revocations:
        rule_metrics.early_revocations.inc()
        log.info("revocation of a voucher whose mint is not here yet; parked until it is",
                 extra={"voucher_id": voucher_id})
    if batch.frozen:
        wake_relay()  # before the commit: the relay's next poll (OUTBOX_IDLE_POLL_S) publishes at the latest
    return batch


async def _freeze(conn: asyncpg.Connection, revoked: ev.VoucherRevoked, *, topic: str, now: dt.datetime,
                  out: list, batch: IssuingBatch) -> None:
    """Freeze a revoked voucher: void its open holds (reason "revoked"), move its whole balance out to the budget,
    and announce that as VoucherFrozen. After this, holds and redemptions are refused (409 voucher_revoked).

    Under the voucher's row lock, so it is serialised with every redemption, capture and refund: what committed
    before is spent, what comes after is refused (or, for a refund, passed on to the budget).
    """
    d = revoked.data
    row = await conn.fetchrow(LOCK_VOUCHER_SQL, d.voucher_id, None)
    if row is None:  # a batch-minted voucher's mint travels on another partition and is not here yet: park it
        await conn.execute(PARK_REVOCATION_SQL, d.voucher_id, _encoder.encode(revoked))
        batch.parked_revocations.append(d.voucher_id)
        return
    voucher = store.voucher_state(row)
    if voucher.status == "revoked":
        return
    if voucher.status == "expired":  # expiry came first and already moved the value: the saga ends with nothing
        out.append(_event(topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
            voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=0, reason=d.reason,
            program=voucher.program), revoked.actor, now))
        batch.frozen.append((voucher.city, 0))
        return
    holds = await conn.fetch(LOCK_OPEN_HOLDS_SQL, voucher.voucher_id)
    voucher = await _void_holds(conn, voucher, holds, status="voided", reason="revoked", topic=topic, now=now,
                                actor=revoked.actor, out=out)
    batch.holds_voided.extend((voucher.city, h["amount"]) for h in holds)
    frozen = store.voucher_after(voucher, await conn.fetchrow(FREEZE_SQL, voucher.voucher_id, now))
    returned = voucher.balance
    assert frozen.status == "revoked" and frozen.returned == voucher.returned + returned
    out.append(_event(topic, voucher.voucher_id, ev.VoucherFrozen, ev.VoucherFrozenData(
        voucher_id=voucher.voucher_id, city=voucher.city, year=voucher.year, returned=returned, reason=d.reason,
        program=voucher.program), revoked.actor, now))
    batch.frozen.append((voucher.city, returned))


# --- the sweepers' steps ---------------------------------------------------------------------------------------------

@dataclass
class Swept:
    holds: list[tuple[str, int]] = dataclasses.field(default_factory=list)                 # (city, amount)
    vouchers: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)         # (city, disposition, amount)
    candidates: int = 0  # vouchers this round could take: SWEEP_BATCH_MAX means more may be due


async def void_timed_out_holds(svc: Service, now: dt.datetime) -> Swept:
    """Void every active hold past its expires_at, for up to SWEEP_BATCH_MAX vouchers, in one transaction.

    A voucher another transaction holds (a capture racing the timeout, say) is skipped: that transaction sees the
    hold expired and refuses, and the next round voids it. So exactly one of them settles the hold.
    """
    swept = Swept()
    async with svc.pool.acquire() as conn, conn.transaction():
        due = [r[0] for r in await conn.fetch(DUE_HOLD_VOUCHERS_SQL, now, SWEEP_BATCH_MAX)]
        if not due:
            return swept
        out: list = []
        locked = await conn.fetch(LOCK_VOUCHERS_SKIP_LOCKED_SQL, due)
        swept.candidates = len(locked)  # a full batch only when every due voucher could be taken
        for row in locked:
            voucher = store.voucher_state(row)
            holds = await conn.fetch(LOCK_TIMED_OUT_HOLDS_SQL, voucher.voucher_id, now)
            await _void_holds(conn, voucher, holds, status="expired", reason="expired", topic=svc.topic, now=now,
                              actor=ACTOR_HOLD_SWEEPER, out=out)
            swept.holds.extend((voucher.city, h["amount"]) for h in holds)
        await outbox.append(conn, out)
    for city, amount in swept.holds:
        rule_metrics.holds.labels(city, "expired").inc()
        rule_metrics.hold_amount.labels(city, "released").inc(amount)
    if swept.holds:
        svc.wake_relay()
    return swept


async def settle_early_revocations(svc: Service, now: dt.datetime) -> Swept:
    """Freeze the vouchers whose revocation was parked (it came before the mint) and whose mint has since been
    written by a transaction that could not see the parked row (a concurrent consumer batch): up to SWEEP_BATCH_MAX,
    in one transaction, as the consumer would have. An empty table costs one index probe."""
    swept = Swept()
    async with svc.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(TAKE_SETTLEABLE_REVOCATIONS_SQL, SWEEP_BATCH_MAX)
        swept.candidates = len(rows)
        if not rows:
            return swept
        revocations = {r.data.voucher_id: r for r in (_revoked_decoder.decode(row["event"]) for row in rows)}
        await conn.fetch(LOCK_VOUCHERS_SQL, sorted(revocations))
        out: list = []
        batch = IssuingBatch()
        for voucher_id in sorted(revocations):
            await _freeze(conn, revocations[voucher_id], topic=svc.topic, now=now, out=out, batch=batch)
        assert not batch.parked_revocations, "a settleable revocation's voucher is written"
        await outbox.append(conn, out)
    for city, returned in batch.frozen:
        rule_metrics.vouchers_frozen.labels(city).inc()
        rule_metrics.amount_frozen.labels(city).inc(returned)
        swept.vouchers.append((city, "revoked", returned))
    for city, amount in batch.holds_voided:
        rule_metrics.holds.labels(city, "revoked").inc()
        rule_metrics.hold_amount.labels(city, "released").inc(amount)
    svc.wake_relay()
    return swept


async def expire_vouchers(svc: Service, now: dt.datetime) -> Swept:
    """Expire up to SWEEP_BATCH_MAX active vouchers past expires_at with no open hold, in one transaction: the
    unspent balance leaves as VoucherExpired, to lapse or carry by the budget's year-end policy."""
    swept = Swept()
    async with svc.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(LOCK_DUE_VOUCHERS_SQL, now, SWEEP_BATCH_MAX)
        swept.candidates = len(rows)
        if not rows:
            return swept
        vouchers = [store.voucher_state(r) for r in rows]
        dispositions = [domain.expiry_disposition(v, r["budget_policy"]) for v, r in zip(vouchers, rows)]
        for v in vouchers:
            assert domain.is_due_to_expire(v, now), v
        expired = {r["voucher_id"]: r for r in await conn.fetch(
            EXPIRE_VOUCHERS_SQL, [v.voucher_id for v in vouchers], dispositions, now)}
        assert len(expired) == len(vouchers), "a locked due voucher refused to expire"
        out = []
        for v, disposition in zip(vouchers, dispositions):
            after = store.voucher_after(v, expired[v.voucher_id])
            assert after.balance == 0 and after.expired == v.expired + v.balance
            out.append(_event(svc.topic, v.voucher_id, ev.VoucherExpired, ev.VoucherExpiredData(
                voucher_id=v.voucher_id, city=v.city, year=v.year, amount=v.balance,
                disposition=disposition, program=v.program), ACTOR_EXPIRY_SWEEPER, now))  # type: ignore[arg-type]
            swept.vouchers.append((v.city, disposition, v.balance))
        await outbox.append(conn, out)
    for city, disposition, amount in swept.vouchers:
        rule_metrics.vouchers_expired.labels(city, disposition).inc()
        rule_metrics.amount_expired.labels(city, disposition).inc(amount)
    svc.wake_relay()
    return swept


# --- reads -----------------------------------------------------------------------------------------------------------

async def voucher(pool: asyncpg.Pool, voucher_id: str, *, provider: str | None, now: dt.datetime) -> VoucherView:
    """A voucher's balance; a provider sees only vouchers it may redeem (403 provider_not_eligible otherwise)."""
    row = await pool.fetchrow(GET_VOUCHER_SQL, voucher_id, provider)
    if row is None:
        raise NotFound(f"no voucher {voucher_id}")
    v = store.voucher_state(row)
    if provider is not None:
        domain.check_provider_eligible(v, provider, row["provider_cities"])
    return store.voucher_view(v, now)


async def hold(pool: asyncpg.Pool, hold_id: str, *, provider: str | None, now: dt.datetime) -> Hold:
    """A hold; a provider sees only its own (403 otherwise)."""
    row = await pool.fetchrow(GET_HOLD_SQL, hold_id)
    if row is None:
        raise NotFound(f"no hold {hold_id}")
    if provider is not None:
        domain.check_hold_owner(store.hold_state(row), provider)
    return store.hold_view(row, now)


async def redemption(pool: asyncpg.Pool, redemption_id: str, *, provider: str | None) -> RedemptionDetail:
    """A redemption; another provider's reads as absent (404), so ids of others' redemptions reveal nothing."""
    row = await pool.fetchrow(GET_REDEMPTION_SQL, redemption_id)
    if row is None or (provider is not None and row["provider"] != provider):
        raise NotFound(f"no redemption {redemption_id}")
    return store.redemption_detail(row)


async def statement(pool: asyncpg.Pool, provider: str, start: dt.datetime | None, end: dt.datetime | None,
                    city: str | None) -> Statement:
    """A provider's redemptions (captures included) and refunds in [start, end), with totals, from one snapshot.

    Each line's created_at is its event's occurred_at, so the totals equal the movements of the ledger's
    provider:{provider} account over entries whose occurred_at is in the same period.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        args = (provider, start, end, city)
        totals = await conn.fetchrow(STATEMENT_TOTALS_SQL, *args)
        redemptions = await conn.fetch(STATEMENT_REDEMPTIONS_SQL, *args, STATEMENT_LINES_MAX)
        refunds = await conn.fetch(STATEMENT_REFUNDS_SQL, *args, STATEMENT_LINES_MAX)
    return store.statement_of(provider, city, start, end, totals, redemptions, refunds)
