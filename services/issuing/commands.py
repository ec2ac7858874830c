"""Issuing commands: one function per command and per consumed event, and the two reads of the edge.

Each command locks what it changes, runs the domain checks (`domain.py`) in their documented order, writes, appends
its events to the outbox in the same transaction and returns its answer. No HTTP here: the edge (`app.py`) parses,
authorises, calls one command and responds. Lock order, for every transaction of this service: cities (sorted) →
budgets (sorted by city, program, year) → enterprise_usage (sorted) → vouchers (sorted), so that the admin's
commands, the mint writers and the consumer never wait in a cycle. City-keyed events (CitySet, ProgramSet,
BudgetSet, BudgetCarried) are written under their city row's lock, so their outbox order is their commit order.

Budget history: every event that changes a budget's amount or committed carries the budget's step (budget_seq,
budget_amount, budget_committed after it; domain.py "Budget history"), numbered under the budget row's lock from
its seq and written with the change, in one transaction.
"""
from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple

import asyncpg
import msgspec

from schemas import events as ev
from schemas.common import DEFAULT_PROGRAM
from schemas.issuing import (
    BatchMintOut, Budget, BudgetIn, City, CityIn, MintIn, Program, ProgramIn, Provider, ProviderIn, RevokeIn, Voucher,
)
from schemas.limits import IDEMPOTENCY_CONCURRENT_ATTEMPTS_MAX, KAFKA_RECORD_BYTES_MAX, VOUCHERS_PER_EVENT_MAX

from services.common import idempotency, metrics, outbox
from services.common.ids import uuid7s
from services.common.auth import Principal, require
from services.common.consumer import Delivered
from services.common.errors import NotFound, ServiceError, ValidationFailed
from services.common.group_commit import ABANDONED, TAKEN, WRITING, Command

from . import domain, rule_metrics, store
from .domain import BudgetKey, BudgetState, BudgetStep, ProgramKey, ProgramState, UsageKey

if TYPE_CHECKING:
    from .writer import Writers

log = logging.getLogger("cvl.issuing")

PRODUCER: Final = "issuing"
ACTOR_CARRY: Final = "system:year-end-carry"  # BudgetCarried: emitted on a consumed VoucherExpired
ACTOR_RETURN: Final = "system:revocation-return"  # BudgetReturned: emitted on a consumed VoucherFrozen

_encoder: Final = msgspec.json.Encoder()
_MINTED_TYPE: Final = outbox.row_type(ev.VoucherMinted)  # the outbox rows' types, as outbox.append writes them
_BATCH_MINTED_TYPE: Final = outbox.row_type(ev.VouchersMinted)


@dataclass(frozen=True)
class Issuing:
    """What the commands write with: the pool, the topic their events go to, and the relay to wake after a commit."""

    pool: asyncpg.Pool
    topic: str
    wake_relay: Callable[[], None]


# --- cities, budgets, providers ------------------------------------------------------------------------------------

async def set_city(ctx: Issuing, actor: str, city: str, body: CityIn) -> idempotency.Answer:
    """Create or rename a city; CitySet goes out only when something changed. A new city has its program `default`
    (kind compute, the first release's city budget) from the start; CitySet stands for it (no ProgramSet)."""
    async def command(conn: asyncpg.Connection) -> tuple[int, City]:
        if await conn.fetchval(store.UPSERT_CITY_SQL, city, body.name, body.currency):
            await conn.execute(store.INSERT_DEFAULT_PROGRAM_SQL, city)
            data = ev.CitySetData(city=city, name=body.name, currency=body.currency)
            await outbox.append(conn, [(ctx.topic, city, outbox.envelope(
                ev.CitySet, data, producer=PRODUCER, actor=actor))])
        return 200, City(city=city, name=body.name, currency=body.currency)

    answer = await idempotency.run(ctx.pool, None, command)
    ctx.wake_relay()
    return answer


async def _lock_city(conn: asyncpg.Connection, city: str) -> None:
    """Lock the city row first: every city-keyed event is written under it, so its outbox order is commit order."""
    if await conn.fetchval(store.LOCK_CITY_SQL, city) is None:
        raise NotFound(f"no city {city}; create it with PUT /v1/cities/{city}")


async def set_program(ctx: Issuing, actor: str, city: str, program: str, body: ProgramIn) -> idempotency.Answer:
    """Create or change a program (voucher scheme) of a city; ProgramSet goes out only when something changed. Its
    kind is fixed once it has minted a voucher (409 conflict)."""
    wanted = ProgramState(name=body.name, kind=body.kind, eligible=body.eligible)

    async def command(conn: asyncpg.Connection) -> tuple[int, Program]:
        await _lock_city(conn, city)
        row = await conn.fetchrow(store.GET_PROGRAM_SQL, city, program)
        current = store.program_state(row)
        minted = False
        if current is not None and current.kind != wanted.kind:
            await conn.fetch(store.LOCK_PROGRAM_BUDGETS_SQL, city, program)
            minted = await conn.fetchval(store.PROGRAM_MINTED_SQL, city, program)
        if domain.program_changes(city, program, current, wanted, minted=minted):
            row = await conn.fetchrow(store.UPSERT_PROGRAM_SQL, city, program, body.name, body.kind,
                                      store.eligibility_json(body.eligible))
            data = ev.ProgramSetData(city=city, program=program, name=body.name, kind=body.kind,
                                     eligible=body.eligible)
            await outbox.append(conn, [(ctx.topic, city, outbox.envelope(
                ev.ProgramSet, data, producer=PRODUCER, actor=actor))])
        assert row is not None
        return 200, store.program_view(row)

    answer = await idempotency.run(ctx.pool, None, command)
    ctx.wake_relay()
    return answer


async def read_program(pool: asyncpg.Pool, city: str, program: str) -> Program:
    row = await pool.fetchrow(store.GET_PROGRAM_SQL, city, program)
    if row is None:
        raise NotFound(f"city {city} has no program {program}")
    return store.program_view(row)


async def set_budget(ctx: Issuing, actor: str, city: str, year: int, body: BudgetIn, *,
                     program: str = DEFAULT_PROGRAM) -> idempotency.Answer:
    """Set a program's annual budget (the city's budget: program `default`): never below what is committed;
    BudgetSet goes out only when something changed."""
    wanted = BudgetState(body.amount, 0, body.enterprise_cap, body.year_end)

    async def command(conn: asyncpg.Connection) -> tuple[int, Budget]:
        await _lock_city(conn, city)
        if await conn.fetchrow(store.GET_PROGRAM_SQL, city, program) is None:
            raise NotFound(f"city {city} has no program {program}; create it with "
                           f"PUT /v1/cities/{city}/programs/{program}")
        inserted = await conn.fetchrow(store.INSERT_BUDGET_SQL, city, program, year, body.amount,
                                       body.enterprise_cap, body.year_end)
        current = None if inserted is not None else store.budget_state(
            await conn.fetchrow(store.LOCK_BUDGET_SQL, city, program, year))
        if domain.budget_changes(city, year, current, wanted, program=program):
            previous, committed = (0, 0) if current is None else (current.amount, current.committed)
            step = inserted
            if current is not None:
                step = await conn.fetchrow(store.UPDATE_BUDGET_SQL, city, program, year, body.amount,
                                           body.enterprise_cap, body.year_end)
                assert step is not None and step["seq"] == current.seq + 1
            assert step["committed"] == committed <= step["amount"] == body.amount
            data = ev.BudgetSetData(city=city, year=year, amount=body.amount, previous_amount=previous,
                                    delta=body.amount - previous, committed=committed,
                                    enterprise_cap=body.enterprise_cap, year_end=body.year_end, program=program,
                                    budget_seq=step["seq"], budget_amount=step["amount"],
                                    budget_committed=step["committed"])
            await outbox.append(conn, [(ctx.topic, city, outbox.envelope(
                ev.BudgetSet, data, producer=PRODUCER, actor=actor))])
        return 200, store.budget_view(await conn.fetchrow(store.GET_BUDGET_SQL, city, program, year))

    answer = await idempotency.run(ctx.pool, None, command)
    ctx.wake_relay()
    return answer


async def read_budget(pool: asyncpg.Pool, city: str, year: int, *, program: str = DEFAULT_PROGRAM) -> Budget:
    row = await pool.fetchrow(store.GET_BUDGET_SQL, city, program, year)
    if row is None:
        if program == DEFAULT_PROGRAM:
            raise NotFound(f"city {city} has no budget for {year}")
        raise NotFound(f"program {program} of city {city} has no budget for {year}")
    budget = store.budget_view(row)
    assert budget.committed + budget.available == budget.amount
    return budget


async def set_provider(ctx: Issuing, actor: str, provider: str, body: ProviderIn) -> idempotency.Answer:
    """Whitelist a provider for cities that exist; ProviderSet goes out only when something changed."""
    cities = sorted(set(body.cities))

    async def command(conn: asyncpg.Connection) -> tuple[int, Provider]:
        known = {r["city"] for r in await conn.fetch(store.KNOWN_CITIES_SQL, cities)}
        domain.check_cities_known(body.cities, known)
        if await conn.fetchval(store.UPSERT_PROVIDER_SQL, provider, body.name, cities):
            data = ev.ProviderSetData(provider=provider, name=body.name, cities=cities)
            await outbox.append(conn, [(ctx.topic, provider, outbox.envelope(
                ev.ProviderSet, data, producer=PRODUCER, actor=actor))])
        return 200, Provider(provider=provider, name=body.name, cities=cities)

    answer = await idempotency.run(ctx.pool, None, command)
    ctx.wake_relay()
    return answer


# --- minting: commands queue for their budget's writer (writer.py), which runs `write_mints` for a batch -------------

@dataclass(slots=True)
class MintCommand(Command):
    """One mint request (a single voucher, or an all-or-nothing batch) on its way through a writer."""

    vouchers: list[MintIn]
    actor: str
    key: idempotency.Key | None
    batch: bool  # answer with {"vouchers": [...]} rather than one voucher
    minted: list[Voucher] = field(default_factory=list)
    refusal: ServiceError | None = None
    replay: bool = False  # the key was already used: answer with the stored response
    body: bytes | None = None  # the 201 body, once encoded (minted_body)


class MintOutcome(NamedTuple):
    budgets: dict[BudgetKey, BudgetState]  # after the batch
    accepted: int
    refused: int
    dropped: int                           # abandoned by their callers before anything was decided


def minted_body(command: MintCommand) -> bytes:
    """The 201 body of an accepted mint: the voucher, or {"vouchers": [...]} for a batch request. Encoded once: a
    keyed command's stored answer and its reply are the same bytes."""
    assert command.refusal is None and command.minted
    if command.body is None:
        command.body = _encoder.encode(BatchMintOut(vouchers=command.minted) if command.batch else command.minted[0])
    return command.body


async def mint(ctx: Issuing, writers: Writers, actor: str, vouchers: list[MintIn], key: idempotency.Key | None, *,
               batch: bool) -> idempotency.Answer:
    """Mint one voucher, or a batch all or nothing (possibly across programs), within its programs' rules, budgets
    and enterprise caps (201). One budget: that budget's writer; several: a transaction of its own."""
    if key is not None and (stored := await idempotency.lookup(ctx.pool, key)) is not None:
        return stored
    # After the replay lookup: a retry of a mint whose expires_at has passed since still gets its first answer.
    domain.check_expiries_ahead(vouchers, outbox.now(), batch=batch)
    budgets = {(v.city, v.program, v.year) for v in vouchers}
    writer_key = BudgetKey(*next(iter(budgets))) if len(budgets) == 1 else None
    for _attempt in range(IDEMPOTENCY_CONCURRENT_ATTEMPTS_MAX):
        command = await writers.submit(writer_key, MintCommand(vouchers=vouchers, actor=actor, key=key, batch=batch))
        if command.refusal is not None:
            raise command.refusal
        if not command.replay:
            return idempotency.Answer(201, minted_body(command))
        assert key is not None
        if (stored := await idempotency.lookup(ctx.pool, key)) is not None:
            return stored
        # The key's first use was refused (or abandoned) and released in the same batch: run this one for real.
    raise ValidationFailed("the Idempotency-Key is being used by concurrent requests", field="Idempotency-Key")


async def write_mints(conn: asyncpg.Connection, commands: list[MintCommand], *, topic: str) -> MintOutcome:
    """Decide and write a writer's batch in the caller's transaction (see DESIGN.md, "The hot account").

    Keys are claimed, budgets locked, commands whose callers went during the lock wait dropped, the rest decided in
    arrival order (a refusal refuses only its command): first their programs' rules (program known, kind,
    eligibility), then budgets and caps; and written: budgets, enterprise usage, vouchers, their events and the
    stored answers of keyed commands.

    Round trips, each only when needed: claim keys (keyed commands), lock budgets, read programs, lock usage (only
    of budgets with an enterprise cap: the decision reads it), raise capped usage; then ONE statement raising the
    budgets, adding to the uncapped usage, inserting the vouchers and queueing their events in the outbox
    (store.WRITE_MINTS_SQL); the keys' answers or releases. A batch without keys on budgets without caps costs three
    statements between BEGIN and COMMIT (it cost seven).
    """
    assert conn.is_in_transaction()
    assert all(c.state in (TAKEN, ABANDONED) for c in commands)
    live = commands
    keyed = [c for c in commands if c.key is not None]
    if keyed:
        keyed.sort(key=lambda c: (c.key.principal, c.key.key))
        claimed = await idempotency.claim_many(conn, [c.key for c in keyed])
        seen: set[tuple[str, str]] = set()
        for c in keyed:
            k = (c.key.principal, c.key.key)
            if k not in claimed or k in seen:  # used before, or twice in this batch
                c.replay = True
            seen.add(k)
        live = [c for c in commands if not c.replay]

    keys = sorted(BudgetKey(*k) for k in {(v.city, v.program, v.year) for c in live for v in c.vouchers})
    rows = await conn.fetch(store.LOCK_BUDGETS_SQL, *_columns(keys, 3))
    # The lock wait is where a batch spends its time. A caller that went meanwhile was told 503: its command is
    # dropped here, before anything is decided; from here on, a caller that goes waits for the commit instead.
    gone = [c for c in live if c.state == ABANDONED]
    live = [c for c in live if c.state != ABANDONED]
    for c in live:
        c.state = WRITING
    budgets = {store.budget_key(r): store.budget_state(r) for r in rows}
    before = {k: b.committed for k, b in budgets.items()}
    minted_before = {store.budget_key(r): r["minted"] for r in rows}
    steps = domain.Steps({k: BudgetStep(b.seq, b.amount, b.committed) for k, b in budgets.items()})
    # The programs' rules, read under the budget locks (a kind change waits for them: store.GET_PROGRAMS_SQL).
    pkeys = sorted({(k.city, k.program) for k in keys})
    programs: dict[ProgramKey, ProgramState] = {}
    if pkeys:
        programs = {(r["city"], r["program"]): store.program_state(r) for r in await conn.fetch(  # type: ignore
            store.GET_PROGRAMS_SQL, *_columns(pkeys, 2))}
    for c in live:
        try:
            domain.check_programs(programs, c.vouchers, batch=c.batch)
        except ServiceError as refusal:
            c.refusal = refusal.with_traceback(None)  # kept without this frame: no cycle through the batch
    deciding = [c for c in live if c.refusal is None]
    # Enterprise usage is read (and locked) only where a cap decides something: the budgets with one that exist (a
    # command on a missing budget is refused before its cap counts). Uncapped usage is only added to, below: under
    # the budget's row lock nothing else writes it.
    capped = {k for k, b in budgets.items() if b.enterprise_cap is not None}
    usage: dict[UsageKey, int] = {}
    if capped:
        ukeys = sorted({UsageKey(v.city, v.program, v.year, v.beneficiary) for c in deciding for v in c.vouchers
                        if (v.city, v.program, v.year) in capped})
        if ukeys:
            usage = {UsageKey(r["city"], r["program"], r["year"], r["beneficiary"]): r["used"]
                     for r in await conn.fetch(store.LOCK_USAGE_SQL, *_columns(ukeys, 4))}
    usage_before = dict(usage)
    for c, refusal in zip(deciding, domain.decide(budgets, usage, [c.vouchers for c in deciding])):
        c.refusal = refusal

    await _raise_usage(conn, budgets, {k: u for k, u in usage.items() if k.budget in capped}, usage_before)
    accepted = [c for c in live if c.refusal is None]
    deltas = {k: b.committed - before[k] for k, b in budgets.items() if b.committed != before[k]}
    assert bool(deltas) == bool(accepted)
    if accepted:
        free = sorted((k, used) for k, used in usage.items() if k.budget not in capped)
        events = _new_vouchers(accepted, budgets, programs, steps)
        bkeys = list(deltas)
        vouchers = Counter(BudgetKey(v.city, v.program, v.year) for c in accepted for v in c.minted)
        for k in bkeys:  # the steps, taken in order, end where the decisions did
            assert steps.now(k).committed == budgets[k].committed and steps.count[k] >= 1, k
        updated = await conn.fetch(store.WRITE_MINTS_SQL, *_columns(bkeys, 3), list(deltas.values()),
                                   *_columns([k for k, _ in free], 4), [used for _, used in free],
                                   *_voucher_columns(accepted), accepted[0].minted[0].created_at, topic,
                                   *(list(column) for column in zip(*events)),
                                   [steps.count[k] for k in bkeys], [steps.start[k].seq for k in bkeys],
                                   [vouchers[k] for k in bkeys])
        assert len(updated) == len(deltas), "a budget row refused its update: committed would exceed amount"
        for r in updated:
            assert 0 <= r["committed"] <= r["amount"]
            assert r["minted"] == minted_before[store.budget_key(r)] + vouchers[store.budget_key(r)]
            assert budgets[store.budget_key(r)].committed == r["committed"]
            assert r["seq"] == steps.now(store.budget_key(r)).seq
            assert r["usage_rows"] == len(free)
    done = [c for c in accepted if c.key is not None]
    if done:
        await idempotency.complete_many(conn, [(c.key, 201, minted_body(c)) for c in done])
    # Refused and dropped commands change nothing, their keys included: release them so that a retry runs again.
    released = [c.key for c in live if c.key is not None and c.refusal is not None]
    released += [c.key for c in gone if c.key is not None]
    if released:
        await idempotency.release_many(conn, released)
    return MintOutcome(budgets, len(accepted), len(live) - len(accepted), len(gone))


def _columns(keys: list, width: int) -> list[list]:
    """Keys (tuples) as the parallel arrays an unnest() statement takes: their first `width` fields."""
    return [[k[i] for k in keys] for i in range(width)]


async def _raise_usage(conn: asyncpg.Connection, budgets: dict[BudgetKey, BudgetState], usage: dict[UsageKey, int],
                       before: dict[UsageKey, int]) -> None:
    """Write the batch's enterprise usage of capped budgets: existing rows raised, new rows inserted, each within
    its cap."""
    changed = sorted(k for k, used in usage.items() if used != before.get(k, 0))
    for new_rows, sql in ((False, store.RAISE_USAGE_SQL), (True, store.INSERT_USAGE_SQL)):
        ks = [k for k in changed if (k not in before) == new_rows]
        if not ks:
            continue
        written = await conn.fetch(sql, *_columns(ks, 4), [usage[k] - before.get(k, 0) for k in ks],
                                   [budgets[k.budget].enterprise_cap for k in ks])
        assert len(written) == len(ks), "an enterprise usage row refused its update: the cap would be exceeded"
        for r in written:
            assert r["used"] == usage[UsageKey(r["city"], r["program"], r["year"], r["beneficiary"])]


class QueuedEvent(NamedTuple):
    """An event as store.WRITE_MINTS_SQL queues it in the outbox (the layout of services.common.outbox)."""

    key: str
    event_id: str
    type: str
    payload: bytes


def _new_vouchers(accepted: list[MintCommand], budgets: dict[BudgetKey, BudgetState],
                  programs: dict[ProgramKey, ProgramState], steps: domain.Steps) -> list[QueuedEvent]:
    """The accepted commands' vouchers (each command's `minted`, its answer) and their events, in order.

    A single mint's voucher travels as a VoucherMinted keyed by its id. A batch request's vouchers travel as
    VouchersMinted events of up to VOUCHERS_PER_EVENT_MAX vouchers of one budget (city, program, year), keyed by
    city as budget events are: one outbox row, one Kafka record and one journal entry for many vouchers instead of
    one each. An event whose encoding would pass KAFKA_RECORD_BYTES_MAX (long provider lists) is split in halves
    until each part fits. Each event is one step of its budget, taken from `steps` in the events' order.
    """
    now = outbox.now()
    n = sum(len(c.vouchers) for c in accepted)
    singles = sum(len(c.vouchers) for c in accepted if not c.batch)
    ids = uuid7s(n + singles)  # the vouchers' ids, then the single mints' event ids
    event_ids = iter(ids[n:])
    events: list[QueuedEvent] = []
    i = 0
    for c in accepted:
        actor, minted = c.actor, c.minted
        for v in c.vouchers:
            voucher_id, city, program, year = ids[i], v.city, v.program, v.year
            i += 1
            kind = domain.voucher_kind(v, programs[(city, program)])
            minted.append(Voucher(
                voucher_id=voucher_id, city=city, year=year, beneficiary=v.beneficiary, kind=kind,  # type: ignore
                amount=v.amount, subsidy_ratio_bp=v.subsidy_ratio_bp, providers=v.providers,
                expires_at=v.expires_at, status="active", created_at=now, program=program))
            if c.batch:
                continue
            step = steps.take(BudgetKey(city, program, year), v.amount)
            data = ev.VoucherMintedData(
                voucher_id=voucher_id, city=city, year=year, beneficiary=v.beneficiary, kind=kind,  # type: ignore
                amount=v.amount, subsidy_ratio_bp=v.subsidy_ratio_bp, providers=v.providers,
                expires_at=v.expires_at, created_at=now, year_end=budgets[(city, program, year)].year_end,  # type: ignore
                program=program, budget_seq=step.seq, budget_amount=step.amount, budget_committed=step.committed)
            event = outbox.envelope(ev.VoucherMinted, data, producer=PRODUCER, actor=actor, occurred_at=now,
                                    event_id=next(event_ids), request_id=c.request_id)
            events.append(QueuedEvent(voucher_id, event.event_id, _MINTED_TYPE, _encoder.encode(event)))
        if c.batch:
            by_budget: dict[BudgetKey, list[ev.MintedVoucher]] = {}
            for m in minted:
                by_budget.setdefault(BudgetKey(m.city, m.program, m.year), []).append(ev.MintedVoucher(
                    voucher_id=m.voucher_id, beneficiary=m.beneficiary, kind=m.kind, amount=m.amount,
                    subsidy_ratio_bp=m.subsidy_ratio_bp, providers=m.providers, expires_at=m.expires_at))
            for key, vouchers in by_budget.items():
                for at in range(0, len(vouchers), VOUCHERS_PER_EVENT_MAX):
                    events.extend(_batch_events(key, vouchers[at:at + VOUCHERS_PER_EVENT_MAX],
                                                budgets[key].year_end, actor, now, steps, c.request_id))
    assert i == n
    return events


def _batch_events(key: BudgetKey, vouchers: list[ev.MintedVoucher], year_end: str, actor: str,
                  now: dt.datetime, steps: domain.Steps, request_id: str | None = None) -> list[QueuedEvent]:
    """One VouchersMinted of `vouchers` on budget `key`, or, when it would encode past KAFKA_RECORD_BYTES_MAX,
    those of each half (recursively): every part still fits one Kafka record, and is one step of the budget (taken
    only for the events that go out)."""
    amount = sum(v.amount for v in vouchers)
    step = steps.peek(key, amount)
    data = ev.VouchersMintedData(city=key.city, program=key.program, year=key.year, created_at=now,
                                 year_end=year_end, amount=amount,  # type: ignore[arg-type]
                                 vouchers=vouchers, budget_seq=step.seq, budget_amount=step.amount,
                                 budget_committed=step.committed)
    event = outbox.envelope(ev.VouchersMinted, data, producer=PRODUCER, actor=actor, occurred_at=now,
                            request_id=request_id)
    payload = _encoder.encode(event)
    if len(payload) <= KAFKA_RECORD_BYTES_MAX:
        assert steps.take(key, amount) == step
        return [QueuedEvent(key.city, event.event_id, _BATCH_MINTED_TYPE, payload)]
    assert len(vouchers) > 1, "one voucher's VouchersMinted cannot exceed KAFKA_RECORD_BYTES_MAX (see schemas.limits)"
    half = len(vouchers) // 2
    return [*_batch_events(key, vouchers[:half], year_end, actor, now, steps, request_id),
            *_batch_events(key, vouchers[half:], year_end, actor, now, steps, request_id)]


def _voucher_columns(accepted: list[MintCommand]) -> list[list]:
    """The accepted vouchers as the parallel arrays store.WRITE_MINTS_SQL inserts (`minted` in order)."""
    vs = [v for c in accepted for v in c.minted]
    return [[v.voucher_id for v in vs], [v.city for v in vs], [v.program for v in vs], [v.year for v in vs],
            [v.beneficiary for v in vs], [v.kind for v in vs], [v.amount for v in vs],
            [v.subsidy_ratio_bp for v in vs], [",".join(v.providers) if v.providers else "" for v in vs],
            [v.expires_at for v in vs]]


async def read_voucher(pool: asyncpg.Pool, voucher_id: str) -> Voucher:
    row = await pool.fetchrow(store.GET_VOUCHER_SQL, voucher_id)
    if row is None:
        raise NotFound(f"no voucher {voucher_id}")
    return store.voucher_view(row)


# --- revocation: the saga's first step (see `apply_redemption_events` for its last) --------------------------------

async def revoke(ctx: Issuing, who: Principal, voucher_id: str, body: RevokeIn,
                 key: idempotency.Key | None) -> idempotency.Answer:
    """The issuer revokes a voucher of its city.

    The voucher is marked revoked here at once and VoucherRevoked (returned 0: an intent) goes out. The redemption
    service freezes the voucher when it consumes that event (no holds or redemptions after; open holds voided) and
    announces the unspent balance as VoucherFrozen; this service then returns it to the budget. Revoking a revoked
    voucher answers the same voucher again and changes nothing; an expired voucher cannot be revoked.
    """
    revoked: list[Voucher] = []

    async def command(conn: asyncpg.Connection) -> tuple[int, Voucher]:
        row = await conn.fetchrow(store.LOCK_VOUCHER_SQL, voucher_id)
        if row is None:
            raise NotFound(f"no voucher {voucher_id}")
        require(who, "issuer", city=row["city"])
        if not domain.revocable(voucher_id, row["status"]):
            return 200, store.voucher_view(row)
        now = outbox.now()
        updated = await conn.fetchrow(store.REVOKE_VOUCHER_SQL, voucher_id, body.reason, now)
        assert updated is not None and updated["status"] == "revoked"
        data = ev.VoucherRevokedData(voucher_id=voucher_id, city=row["city"], year=row["year"], reason=body.reason,
                                     returned=0)
        await outbox.append(conn, [(ctx.topic, voucher_id, outbox.envelope(
            ev.VoucherRevoked, data, producer=PRODUCER, actor=who.subject, occurred_at=now))])
        view = store.voucher_view(updated)
        revoked.append(view)
        return 200, view

    answer = await idempotency.run(ctx.pool, key, command)
    if revoked:
        ctx.wake_relay()
        rule_metrics.revocations.labels(revoked[0].city, str(revoked[0].year)).inc()
    return answer


# --- consumed: value coming back from the redemption side ----------------------------------------------------------

async def apply_redemption_events(conn: asyncpg.Connection, delivered: list[Delivered], *, topic: str) -> None:
    """Consumer handler (the batch's transaction, fresh events only): the redemption side's end of a voucher.

    VoucherFrozen (a revocation took effect, or a refund on a frozen voucher): `returned` goes back to the budget of
    the voucher's (city, program, year) and to the enterprise's cap, announced as BudgetReturned (city-keyed, the
    budget's step; one per voucher of the batch). VoucherExpired with "lapse": the value stays
    committed (it lapsed, it is not available again). VoucherExpired with "carry": the value stays committed in its
    year too (and in the enterprise's usage), and raises the amount of the NEXT year's budget of the same program,
    created if absent (cap and year end copied from the expiring year's), announced as BudgetCarried (city-keyed,
    written under the city row's lock). Each event applies exactly once (the consumer's processed_events), so the
    amounts simply add up.
    """
    assert conn.is_in_transaction()
    settlements = domain.settlements(d.event for d in delivered)
    if not settlements:
        return
    homes = {r["voucher_id"]: r for r in await conn.fetch(store.HOMES_SQL, sorted(settlements))}
    for voucher_id in sorted(set(settlements) - homes.keys()):
        rule_metrics.unknown_vouchers.inc()
        log.error("redemption event for a voucher this service never minted; skipped",
                  extra={"voucher_id": voucher_id})
    ids = sorted(homes)
    if not ids:
        return
    to_budget: dict[BudgetKey, int] = defaultdict(int)
    lapsed: dict[BudgetKey, int] = defaultdict(int)
    to_usage: dict[UsageKey, int] = defaultdict(int)
    returned: list[tuple[str, BudgetKey, int]] = []  # (voucher, its budget, value), in voucher order
    carried: list[tuple[str, BudgetKey, int]] = []  # (voucher, its budget, value), in voucher order
    for vid in ids:
        h, s = homes[vid], settlements[vid]
        key = BudgetKey(h["city"], h["program"], h["year"])
        to_budget[key] += s.returned
        returned.append((vid, key, s.returned))
        lapsed[key] += s.lapsed
        to_usage[UsageKey(key.city, key.program, key.year, h["beneficiary"])] += s.returned
        if s.carried:
            carried.append((vid, key, s.carried))

    # The service's lock order: cities (for the city-keyed BudgetCarried), budgets, enterprise usage, vouchers.
    targets = sorted({domain.next_year(source) for _, source, _ in carried})
    if carried:
        await conn.fetch(store.LOCK_CITIES_SQL, sorted({k.city for k in targets}))
        await _create_carry_targets(conn, targets, sorted({source for _, source, _ in carried}))
    bkeys = sorted(set(to_budget) | set(targets))
    locked = {store.budget_key(r): store.budget_state(r)
              for r in await conn.fetch(store.LOCK_BUDGETS_SQL, *_columns(bkeys, 3))}
    ukeys = sorted(to_usage)
    await conn.fetch(store.LOCK_USAGE_SQL, *_columns(ukeys, 4))
    await conn.fetch(store.LOCK_VOUCHERS_SQL, ids)

    # Returns, then carries: each voucher's is one step of its budget, numbered from the seq locked, in this order.
    seq_before = {k: b.seq for k, b in locked.items()}
    returns = domain.give_back(locked, returned)
    bkeys = [k for k in sorted(to_budget) if to_budget[k]]
    if bkeys:
        count = Counter(r.budget for r in returns)
        updated = await conn.fetch(store.RETURN_TO_BUDGETS_SQL, *_columns(bkeys, 3), [to_budget[k] for k in bkeys],
                                   [count[k] for k in bkeys], [seq_before[k] for k in bkeys])
        assert len(updated) == len(bkeys), "more came back than a budget had committed"
        for r in updated:
            b = locked[store.budget_key(r)]
            assert (b.committed, b.seq) == (r["committed"], r["seq"])
            _budget_gauges(store.budget_key(r), r["amount"] - r["committed"])
        await outbox.append(conn, [(topic, r.budget.city, outbox.envelope(
            ev.BudgetReturned, ev.BudgetReturnedData(
                city=r.budget.city, program=r.budget.program, year=r.budget.year, voucher_id=r.voucher_id,
                amount=r.amount, budget_seq=r.step.seq, budget_amount=r.step.amount,
                budget_committed=r.step.committed),
            producer=PRODUCER, actor=ACTOR_RETURN)) for r in returns])
    seq_before = {k: b.seq for k, b in locked.items()}
    steps = domain.carry(locked, carried)
    if steps:
        raised: dict[BudgetKey, int] = defaultdict(int)
        for step in steps:
            raised[step.target] += step.amount
        rkeys = sorted(raised)
        count = Counter(step.target for step in steps)
        updated = await conn.fetch(store.CARRY_INTO_BUDGETS_SQL, *_columns(rkeys, 3), [raised[k] for k in rkeys],
                                   [count[k] for k in rkeys], [seq_before[k] for k in rkeys])
        assert len(updated) == len(rkeys), "a carry found no next year's budget"
        for r in updated:
            b = locked[store.budget_key(r)]
            assert (b.amount, b.seq) == (r["amount"], r["seq"])
            _budget_gauges(store.budget_key(r), r["amount"] - r["committed"])
        await outbox.append(conn, [(topic, step.target.city, outbox.envelope(
            ev.BudgetCarried, ev.BudgetCarriedData(
                city=step.target.city, program=step.target.program, year=step.target.year,
                from_year=step.source.year, voucher_id=step.voucher_id, amount=step.amount,
                budget_amount=step.budget_amount, budget_committed=step.budget_committed,
                budget_seq=step.budget_seq),
            producer=PRODUCER, actor=ACTOR_CARRY)) for step in steps])
    ukeys = [k for k in ukeys if to_usage[k]]
    if ukeys:
        updated = await conn.fetch(store.RETURN_TO_USAGE_SQL, *_columns(ukeys, 4), [to_usage[k] for k in ukeys])
        assert len(updated) == len(ukeys), "more came back than an enterprise had used"
    settled = await conn.fetch(store.SETTLE_VOUCHERS_SQL, ids, [settlements[i].returned for i in ids],
                               [settlements[i].lapsed for i in ids], [settlements[i].carried for i in ids],
                               [settlements[i].frozen for i in ids], [settlements[i].expired for i in ids])
    assert len(settled) == len(ids)
    for r in settled:
        assert r["returned"] + r["lapsed"] + r["carried"] <= r["amount"], \
            f"voucher {r['voucher_id']}: more came back than it held"
    for key, amount in to_budget.items():
        if amount:
            rule_metrics.value_returned.labels(key.city, str(key.year)).inc(amount)
    for key, amount in lapsed.items():
        if amount:
            rule_metrics.value_lapsed.labels(key.city, str(key.year)).inc(amount)
    for _, source, amount in carried:
        rule_metrics.value_carried.labels(source.city, str(source.year)).inc(amount)


async def _create_carry_targets(conn: asyncpg.Connection, targets: list[BudgetKey], sources: list[BudgetKey]) -> None:
    """Create the next years' budgets a carry raises that do not exist yet (under their city rows' locks, as
    set_budget creates budgets): amount 0 before the carries, cap and year end of the year carried from."""
    existing = {store.budget_key(r): store.budget_state(r)
                for r in await conn.fetch(store.GET_BUDGETS_SQL, *_columns(sorted({*targets, *sources}), 3))}
    missing = [(t, domain.carried_budget(existing[s])) for s in sources
               if (t := domain.next_year(s)) not in existing]
    if missing:
        created = await conn.fetch(store.INSERT_BUDGETS_SQL, *_columns([t for t, _ in missing], 3),
                                   [b.amount for _, b in missing], [b.enterprise_cap for _, b in missing],
                                   [b.year_end for _, b in missing])
        assert len(created) == len(missing), "a budget appeared while its city row was locked"


def _budget_gauges(key: BudgetKey, available: int) -> None:
    rule_metrics.program_budget_available.labels(key.city, key.program, str(key.year)).set(available)
    if key.program == DEFAULT_PROGRAM:
        metrics.budget_available.labels(key.city, str(key.year)).set(available)
