"""A batch mint travels as one event: `POST /v1/vouchers/batch` writes one VouchersMinted per budget (keyed by city),
and the redemption service, the ledger and the auditor's verifier each take it as the vouchers it names.

- through the real stack: one record on Kafka for a batch, every voucher redeemable, one journal entry debiting
  the budget once and crediting each voucher, the report's `issued`, and `cvl audit verify --url` passing;
- a batch travels as events of at most VOUCHERS_PER_EVENT_MAX vouchers, each within one Kafka record;
- a revocation consumed before its voucher's batch mint (the mint travels on the city's partition, the revocation
  on the voucher's) is parked and applied once the mint is written: in the mint's own transaction, or by the
  sweeper when the mint was written by a transaction that could not see the parked row. Those run against a real
  PostgreSQL with the consumer handler called directly (crafted events on the stack's topics would reach the
  issuing service and the ledger too).
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import json
import uuid
from pathlib import Path

import msgspec
import pytest

from schemas import events as ev
from schemas.limits import ID_LENGTH_MAX, KAFKA_RECORD_BYTES_MAX, PROVIDERS_PER_LIST_MAX, VOUCHERS_PER_EVENT_MAX
from services.common import db, outbox
from services.common.consumer import Delivered
from services.common.settings import Settings
from services.issuing import commands as issuing_commands
from services.issuing.domain import BudgetKey, BudgetStep, Steps
from services.redemption import commands
from services.stack import scratch_database
from tests.harness import eventually, read_topic
from tests.test_audit_verify import cli

BATCH = 120  # two VouchersMinted: 100 and 20


async def test_a_batch_is_a_few_events_and_entries_and_each_of_its_vouchers_is_redeemable(stack, world_factory, api):
    w = await world_factory(10_000_000)
    amounts = [100 + i for i in range(BATCH)]
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer,
                       json={"vouchers": [w.mint_body(a) for a in amounts]})
    assert r.status == 201, r.body
    vouchers = r.body["vouchers"]
    ids = [v["voucher_id"] for v in vouchers]
    assert (await w.budget())["committed"] == sum(amounts)

    # Kafka: VouchersMinted events of up to 100 vouchers (120: two), keyed by the city, naming every voucher once,
    # in the answer's order.
    async def batch_events():
        records = await read_topic(stack.env["CVL_KAFKA_BOOTSTRAP"], stack.topics["issuing"])
        mine = [(k, json.loads(v)) for k, v in records if json.loads(v)["data"].get("city") == w.city]
        minted = [(k, e) for k, e in mine if e["type"] in ("VoucherMinted", "VouchersMinted")]
        return minted if len(minted) >= 2 else None
    minted = await eventually(batch_events)
    assert [(k.decode(), e["type"], len(e["data"]["vouchers"])) for k, e in minted] == [
        (w.city, "VouchersMinted", 100), (w.city, "VouchersMinted", 20)]
    assert [v["voucher_id"] for _, e in minted for v in e["data"]["vouchers"]] == ids
    assert [e["data"]["amount"] for _, e in minted] == [sum(amounts[:100]), sum(amounts[100:])]
    assert all(e["data"]["year"] == w.year for _, e in minted)

    # Redemption: every voucher is redeemable with its own amount.
    views = await asyncio.gather(*(w.redeemable(i) for i in ids))
    assert [v["balance"] for v in views] == amounts
    spent = await w.redeem(ids[3], 40)
    assert spent.status == 201 and spent.body["balance"] == amounts[3] - 40

    # Ledger: one entry, the budget debited once with the sum, each voucher credited with its amount.
    async def report():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.body if r.status == 200 and r.body["redeemed"] == 40 else None
    rep = await eventually(report)
    assert (rep["issued"], rep["outstanding"]) == (sum(amounts), sum(amounts) - 40)
    r = await api.call("GET", f"{w.ledger}/v1/accounts/voucher:{ids[3]}", token=w.auditor)
    assert (r.body["credits"], r.body["debits"], r.body["balance"]) == (amounts[3], 40, amounts[3] - 40)
    # A voucher's account belongs to its city: an auditor of that city reads it, one of another city may not.
    r = await api.call("GET", f"{w.ledger}/v1/accounts/voucher:{ids[3]}", token=stack.token("auditor", city=w.city))
    assert r.status == 200 and r.body["balance"] == amounts[3] - 40
    r = await api.call("GET", f"{w.ledger}/v1/accounts/voucher:{ids[3]}", token=stack.token("auditor", city="elsewhere"))
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await api.call("GET", f"{w.ledger}/v1/accounts/budget:{w.city}:{w.year}", token=w.auditor)
    assert r.body["balance"] == 10_000_000 - sum(amounts)
    tb = (await api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)).body
    r = await api.call("GET", f"{w.ledger}/v1/entries?start={max(0, tb['entries'] - 400)}&limit=1000",
                       token=w.auditor)
    entries = r.body["entries"]
    for n, (_, event) in enumerate(minted):
        entry = next(e for e in entries if e["event_id"] == event["event_id"])
        part = slice(100 * n, 100 * (n + 1))
        assert entry["type"] == "VouchersMinted"
        assert [(p["account"], p["debit"], p["credit"]) for p in entry["postings"]] == [
            (f"budget:{w.city}:{w.year}", sum(amounts[part]), 0),
            *((f"voucher:{i}", 0, a) for i, a in zip(ids[part], amounts[part]))]

    # The auditor's verifier accepts the log with the batch entry in it.
    result = await asyncio.to_thread(cli, "verify", "--url", w.ledger, token=w.auditor)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_batch_travels_as_events_of_at_most_100_vouchers_each_within_a_kafka_record():
    """Long provider lists make an event of 100 vouchers pass KAFKA_RECORD_BYTES_MAX: it is split in halves."""
    at = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    key = BudgetKey("wuxi", "default", 2026)
    long_list = [f"p{i:02d}-" + "x" * (ID_LENGTH_MAX - 4) for i in range(PROVIDERS_PER_LIST_MAX)]
    vouchers = [ev.MintedVoucher(voucher_id=str(uuid.uuid4()), beneficiary="b", kind="compute", amount=1 + i,
                                 subsidy_ratio_bp=5000, providers=long_list if i % 10 else None,
                                 expires_at=at) for i in range(VOUCHERS_PER_EVENT_MAX)]
    steps = Steps({key: BudgetStep(seq=41, amount=10**9, committed=100)})
    events = issuing_commands._batch_events(key, vouchers, "lapse", "issuer:wuxi", at, steps)
    assert len(events) > 1
    decoded = [msgspec.json.decode(e.payload, type=ev.Event) for e in events]
    assert all(len(e.payload) <= KAFKA_RECORD_BYTES_MAX and e.key == "wuxi" and e.type == "VouchersMinted"
               for e in events)
    assert [v.voucher_id for d in decoded for v in d.data.vouchers] == [v.voucher_id for v in vouchers]
    assert [d.data.amount for d in decoded] == [sum(v.amount for v in d.data.vouchers) for d in decoded]
    assert len({d.event_id for d in decoded}) == len(decoded)
    # Each part that goes out is one step of the budget, in order (none is taken for the halves' parent).
    assert [d.data.budget_seq for d in decoded] == list(range(42, 42 + len(decoded)))
    assert [d.data.budget_committed for d in decoded] == [
        100 + sum(x.data.amount for x in decoded[:i + 1]) for i in range(len(decoded))]
    assert {d.data.budget_amount for d in decoded} == {10**9} and steps.count[key] == len(decoded)
    # Short lists: one event for all of them.
    short = [msgspec.structs.replace(v, providers=None) for v in vouchers]
    assert len(issuing_commands._batch_events(key, short, "lapse", "issuer:wuxi", at, steps)) == 1


# --- a revocation before its batch mint (redemption service, consumer handler called directly) -------------------

SCHEMA = "redemption"
MIGRATIONS = Path(commands.__file__).parent / "migrations"
TOPIC_ISSUING, TOPIC_REDEMPTION = "test.issuing", "test.redemption"
CITY, YEAR = "wuxi", 2026
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


@pytest.fixture
async def pool(tmp_path: Path):
    async with scratch_database("cvl_batch") as dsn:
        settings = Settings(service="redemption", port=0, pg_dsn=dsn, kafka_bootstrap="unused",
                            topic_issuing=TOPIC_ISSUING, topic_redemption=TOPIC_REDEMPTION, group_prefix="unused",
                            run_dir=tmp_path, pg_pool_max=4)
        p = await db.create_pool(settings, SCHEMA)
        try:
            await db.migrate(p, SCHEMA, MIGRATIONS)
            yield p
        finally:
            await p.close()


def _batch(*amounts: int) -> ev.VouchersMinted:
    vouchers = [ev.MintedVoucher(voucher_id=str(uuid.uuid4()), beneficiary="91320200MA1XXXXX02", kind="compute",
                                 amount=a, subsidy_ratio_bp=10_000, providers=None,
                                 expires_at=T0 + dt.timedelta(days=90)) for a in amounts]
    return outbox.envelope(ev.VouchersMinted, ev.VouchersMintedData(
        city=CITY, year=YEAR, created_at=T0, amount=sum(amounts), vouchers=vouchers), producer="issuing",
        actor="issuer:wuxi", occurred_at=T0)  # type: ignore[return-value]


def _revoked(voucher_id: str) -> ev.VoucherRevoked:
    return outbox.envelope(ev.VoucherRevoked, ev.VoucherRevokedData(
        voucher_id=voucher_id, city=CITY, year=YEAR, reason="not eligible"), producer="issuing",
        actor="issuer:wuxi", occurred_at=T0)  # type: ignore[return-value]


async def _apply(conn, events) -> commands.IssuingBatch:
    delivered = [Delivered(topic=TOPIC_ISSUING, partition=0, offset=i, event=e) for i, e in enumerate(events)]
    return await commands.apply_issuing_events(conn, delivered, topic=TOPIC_REDEMPTION, now=T0,
                                               wake_relay=lambda: None)


async def _frozen(pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT payload FROM outbox ORDER BY id")
    events = [msgspec.json.decode(r["payload"], type=ev.Event) for r in rows]
    return {e.data.voucher_id: e.data.returned for e in events if isinstance(e, ev.VoucherFrozen)}


async def test_a_revocation_before_its_batch_mint_is_parked_then_applied_with_the_mint(pool):
    batch = _batch(500, 300)
    first, second = (v.voucher_id for v in batch.data.vouchers)
    async with pool.acquire() as conn, conn.transaction():
        parked = await _apply(conn, [_revoked(first)])
    assert parked.parked_revocations == [first] and not parked.frozen
    assert await pool.fetchval("SELECT count(*) FROM early_revocations") == 1
    assert await _frozen(pool) == {}

    async with pool.acquire() as conn, conn.transaction():
        applied = await _apply(conn, [batch])
    assert applied.frozen == [(CITY, 500)]
    assert await _frozen(pool) == {first: 500}
    rows = {r["voucher_id"]: (r["status"], r["balance"]) for r in await pool.fetch(
        "SELECT voucher_id::text, status, balance FROM vouchers")}
    assert rows == {first: ("revoked", 0), second: ("active", 300)}
    assert await pool.fetchval("SELECT count(*) FROM early_revocations") == 0
    # A redelivered revocation of the frozen voucher changes nothing.
    async with pool.acquire() as conn, conn.transaction():
        again = await _apply(conn, [_revoked(first)])
    assert not again.frozen and not again.parked_revocations and await _frozen(pool) == {first: 500}


async def test_a_mint_written_beside_a_parking_revocation_is_frozen_by_the_sweeper(pool):
    """The race: the revocation is parked by one transaction while another writes the mint; neither sees the
    other's row, both commit, and the sweeper applies the revocation."""
    batch = _batch(700)
    vid = batch.data.vouchers[0].voucher_id
    async with pool.acquire() as parking, pool.acquire() as minting:
        park = parking.transaction()
        await park.start()
        parked = await _apply(parking, [_revoked(vid)])    # uncommitted: the mint's transaction cannot see it
        assert parked.parked_revocations == [vid]
        async with minting.transaction():
            applied = await _apply(minting, [batch])
        assert not applied.frozen
        await park.commit()
    assert await pool.fetchval("SELECT status FROM vouchers WHERE voucher_id = $1", vid) == "active"

    svc = commands.Service(pool=pool, topic=TOPIC_REDEMPTION, wake_relay=lambda: None)
    swept = await commands.settle_early_revocations(svc, T0)
    assert swept.vouchers == [(CITY, "revoked", 700)]
    assert await _frozen(pool) == {vid: 700}
    assert (await pool.fetchrow("SELECT status, balance FROM vouchers WHERE voucher_id = $1", vid))[:] == (
        "revoked", 0)
    assert (await commands.settle_early_revocations(svc, T0)).candidates == 0  # nothing left, nothing twice
    assert collections.Counter((await _frozen(pool)).values()) == {700: 1}


async def test_ledger_voucher_homes_move_onto_their_accounts(tmp_path: Path):
    """009_voucher_homes_in_accounts.sql: a ledger written before it keeps every voucher's home, now on the
    voucher: and hold: accounts' rows (the voucher table it replaces is gone)."""
    from services.ledger import commands as ledger_commands
    ledger_migrations = Path(ledger_commands.__file__).parent / "migrations"
    old = tmp_path / "ledger" / "migrations"
    old.mkdir(parents=True)
    for f in sorted(ledger_migrations.glob("*.sql")):
        if f.name < "009":
            old.joinpath(f.name).write_text(f.read_text())
    async with scratch_database("cvl_homes") as dsn:
        settings = Settings(service="ledger", port=0, pg_dsn=dsn, kafka_bootstrap="unused", topic_issuing="unused",
                            topic_redemption="unused", group_prefix="unused", run_dir=tmp_path, pg_pool_max=2)
        p = await db.create_pool(settings, "ledger")
        try:
            await db.migrate(p, "ledger", old)
            vid = str(uuid.uuid4())
            await p.execute("INSERT INTO vouchers (voucher_id, city, year, program) VALUES ($1, 'wuxi', 2026, 'model')",
                            vid)
            await p.execute("INSERT INTO accounts (account, debits, credits) VALUES ($1, 0, 9), ($2, 0, 3), "
                            "('provider:gpu', 0, 5)", f"voucher:{vid}", f"hold:{vid}")
            await db.migrate(p, "ledger", ledger_migrations)
            rows = {r["account"]: (r["city"], r["year"], r["program"]) for r in await p.fetch(
                "SELECT account, city, year, program FROM accounts")}
            assert rows == {f"voucher:{vid}": ("wuxi", 2026, "model"), f"hold:{vid}": ("wuxi", 2026, "model"),
                            "provider:gpu": (None, None, None)}
            assert await p.fetchval("SELECT to_regclass('vouchers')") is None
        finally:
            await p.close()


async def test_a_consumer_applies_a_fetch_of_batch_mints_in_transactions_of_bounded_weight(pool, tmp_path: Path):
    """A fetch holding many VouchersMinted events is applied in several transactions, each weighing at most
    CONSUMER_TRANSACTION_WEIGHT_MAX vouchers (or one event), in delivery order, every event once."""
    from types import SimpleNamespace
    from schemas.limits import CONSUMER_TRANSACTION_WEIGHT_MAX
    from services.common.consumer import Consumer, event_weight

    events = [_batch(*[1] * VOUCHERS_PER_EVENT_MAX) for _ in range(3 * CONSUMER_TRANSACTION_WEIGHT_MAX
                                                                   // VOUCHERS_PER_EVENT_MAX)]
    events.insert(5, _revoked(str(uuid.uuid4())))
    records = [SimpleNamespace(topic=TOPIC_ISSUING, partition=0, offset=i, value=ev.encode_event(e))
               for i, e in enumerate(events)]
    parts: list[list[str]] = []

    async def handler(conn, delivered):
        assert conn.is_in_transaction()
        parts.append([d.event.event_id for d in delivered])
    settings = Settings(service="redemption", port=0, pg_dsn="unused", kafka_bootstrap="unused",
                        topic_issuing=TOPIC_ISSUING, topic_redemption=TOPIC_REDEMPTION, group_prefix="test",
                        run_dir=tmp_path)
    consumer = Consumer(settings, pool, topics=[TOPIC_ISSUING], group="weights", handler=handler, claim=False)
    await consumer._apply(records)  # noqa: SLF001 (the poll loop around it needs a broker)
    by_id = {e.event_id: e for e in events}
    assert [i for p in parts for i in p] == [e.event_id for e in events]
    assert len(parts) >= 3
    for p in parts:
        assert sum(event_weight(by_id[i]) for i in p) <= CONSUMER_TRANSACTION_WEIGHT_MAX or len(p) == 1
