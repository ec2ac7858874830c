"""Programs on the redemption side, against a real PostgreSQL but without Kafka or the other services: the consumer
handler and the commands are called directly on a fresh database, and the events they emit are read from the
outbox. (Crafted events on the test stack's topics would also reach the issuing service and the ledger, for budgets
they never set.)

- 003_programs.sql upgrades existing rows to the program `default`;
- a voucher keeps the program of its VoucherMinted, and every event emitted about it carries it;
- the year-end policy is the one of (city, program, year): two programs of one city and year expire differently;
- a voucher of YEAR_MAX lapses under "carry" (there is no next year), and a later refund follows it.
"""
from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path

import asyncpg
import msgspec
import pytest

from schemas import events as ev
from schemas.limits import YEAR_MAX
from schemas.redemption import RedemptionIn, RefundIn
from services.common import db, outbox
from services.common.consumer import Delivered
from services.common.settings import Settings
from services.redemption import commands
from services.stack import scratch_database

MIGRATIONS = Path(commands.__file__).parent / "migrations"
SCHEMA = "redemption"
TOPIC_ISSUING = "test.issuing"
TOPIC_REDEMPTION = "test.redemption"
CITY = "beijing-yizhuang"
YEAR = 2026
PROVIDER = "gpu-cloud"
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
EXPIRES = T0 + dt.timedelta(days=30)
AFTER_EXPIRY = EXPIRES + dt.timedelta(seconds=1)


@pytest.fixture
async def pool(tmp_path: Path):
    async with scratch_database("cvl_programs") as dsn:
        settings = Settings(service="redemption", port=0, pg_dsn=dsn, kafka_bootstrap="unused",
                            topic_issuing=TOPIC_ISSUING, topic_redemption=TOPIC_REDEMPTION, group_prefix="unused",
                            run_dir=tmp_path, pg_pool_max=2)
        p = await db.create_pool(settings, SCHEMA)
        try:
            yield p
        finally:
            await p.close()


def _envelope(cls, data) -> ev.Envelope:
    return outbox.envelope(cls, data, producer="issuing", actor="test", occurred_at=T0)


def _budget_set(program: str, year: int, year_end: str) -> ev.Envelope:
    return _envelope(ev.BudgetSet, ev.BudgetSetData(city=CITY, year=year, amount=10_000, previous_amount=0,
                                                    delta=10_000, committed=0, year_end=year_end,  # type: ignore
                                                    program=program))


def _minted(program: str, *, year: int = YEAR, year_end: str = "lapse", amount: int = 1000) -> ev.Envelope:
    return _envelope(ev.VoucherMinted, ev.VoucherMintedData(
        voucher_id=str(uuid.uuid4()), city=CITY, year=year, beneficiary="91330100MA2XXXXX01", kind="compute",
        amount=amount, subsidy_ratio_bp=10_000, providers=None, expires_at=EXPIRES, created_at=T0,
        year_end=year_end, program=program))  # type: ignore[arg-type]


async def _consume(pool: asyncpg.Pool, events: list[ev.Envelope]) -> None:
    delivered = [Delivered(topic=TOPIC_ISSUING, partition=0, offset=i, event=e) for i, e in enumerate(events)]
    async with pool.acquire() as conn, conn.transaction():
        await commands.apply_issuing_events(conn, delivered, topic=TOPIC_REDEMPTION, now=T0, wake_relay=lambda: None)


async def _emitted(pool: asyncpg.Pool) -> list[ev.Envelope]:
    rows = await pool.fetch("SELECT payload FROM outbox ORDER BY id")
    return [msgspec.json.decode(r["payload"], type=ev.Event) for r in rows]


async def test_existing_rows_become_the_default_program(pool, tmp_path: Path):
    """Rows written before 003_programs.sql read as the program `default`, keyed (city, program, year)."""
    old = tmp_path / "redemption" / "migrations"  # same migration names: redemption/NNN_x.sql
    old.mkdir(parents=True)
    for f in sorted(MIGRATIONS.glob("*.sql")):
        if f.name < "003":
            shutil.copy(f, old / f.name)
    await db.migrate(pool, SCHEMA, old)
    await pool.execute("INSERT INTO budget_policies (city, year, year_end, set_at) VALUES ($1, $2, 'carry', $3)",
                       CITY, YEAR, T0)
    await pool.execute(
        "INSERT INTO vouchers (voucher_id, city, year, beneficiary, kind, amount, balance, subsidy_ratio_bp, "
        "expires_at, minted_at) VALUES ($1, $2, $3, 'b', 'compute', 10, 10, 10000, $4, $5)",
        str(uuid.uuid4()), CITY, YEAR, EXPIRES, T0)
    await db.migrate(pool, SCHEMA, MIGRATIONS)
    assert await pool.fetchval("SELECT program FROM vouchers") == "default"
    assert await pool.fetchval("SELECT program FROM budget_policies") == "default"
    # The same (city, year) may now have a policy per program.
    await pool.execute("INSERT INTO budget_policies (city, program, year, year_end, set_at) "
                       "VALUES ($1, 'model', $2, 'lapse', $3)", CITY, YEAR, T0)


async def test_a_voucher_keeps_its_program_and_every_event_about_it_carries_it(pool):
    await db.migrate(pool, SCHEMA, MIGRATIONS)
    svc = commands.Service(pool=pool, topic=TOPIC_REDEMPTION, wake_relay=lambda: None)
    model, default, last = _minted("model"), _minted("default"), _minted("model", year=YEAR_MAX, year_end="carry")
    await _consume(pool, [
        _envelope(ev.ProviderSet, ev.ProviderSetData(provider=PROVIDER, name="GPU Cloud", cities=[CITY])),
        # One city and year, two programs: only the model program's budget carries.
        _budget_set("model", YEAR, "carry"), _budget_set("default", YEAR, "lapse"),
        _budget_set("model", YEAR_MAX, "carry"),
        model, default, last])
    model_id, default_id, last_id = model.data.voucher_id, default.data.voucher_id, last.data.voucher_id

    view = await commands.voucher(pool, model_id, provider=None, now=T0)
    assert view.program == "model"
    assert (await commands.voucher(pool, default_id, provider=None, now=T0)).program == "default"

    spent = {}
    for vid in (model_id, default_id, last_id):
        answer = await commands.redeem(svc, None, RedemptionIn(voucher_id=vid, amount=100), provider=PROVIDER,
                                       actor=f"provider:{PROVIDER}", now=T0)
        assert answer.status == 201
        spent[vid] = msgspec.json.decode(answer.body)["redemption_id"]
    swept = await commands.expire_vouchers(svc, AFTER_EXPIRY)
    assert sorted(d for _, d, _ in swept.vouchers) == ["carry", "lapse", "lapse"]
    answer = await commands.refund(svc, None, spent[model_id], RefundIn(amount=10), provider=PROVIDER,
                                   actor=f"provider:{PROVIDER}", now=AFTER_EXPIRY)
    assert msgspec.json.decode(answer.body)["returned_to"] == "carried"
    answer = await commands.refund(svc, None, spent[last_id], RefundIn(amount=10), provider=PROVIDER,
                                   actor=f"provider:{PROVIDER}", now=AFTER_EXPIRY)
    assert msgspec.json.decode(answer.body)["returned_to"] == "lapsed"

    emitted = await _emitted(pool)
    program_of = {model_id: "model", default_id: "default", last_id: "model"}
    assert {type(e).__name__ for e in emitted} == {"VoucherRedeemed", "VoucherExpired", "RedemptionRefunded"}
    for e in emitted:
        assert e.data.program == program_of[e.data.voucher_id], e  # type: ignore[attr-defined]
    expired = {(e.data.voucher_id, e.data.refund_id is not None): e.data.disposition  # type: ignore[attr-defined]
               for e in emitted if isinstance(e, ev.VoucherExpired)}
    assert expired == {(model_id, False): "carry", (default_id, False): "lapse", (last_id, False): "lapse",
                       (model_id, True): "carry", (last_id, True): "lapse"}
