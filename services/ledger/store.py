"""Ledger SQL: named, parameterised statements, the batch append (journal and Merkle tree in one transaction), the
signing of checkpoints, and the views read back from them."""
from __future__ import annotations

import base64
import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from typing import Final, NamedTuple

import asyncpg

from schemas.events import encode_event
from schemas.ledger import Account, CityReport, Entry, Posting, TrialBalance

from services.common.consumer import DEAD_LETTER_SQL, Delivered

from . import domain, merkle, notes, page

# --- the append, in the order it runs ---------------------------------------------------------------------------------

LOCK_HEAD_SQL: Final = "SELECT size FROM log_head FOR UPDATE"
JOURNALED_SQL: Final = "SELECT event_id::text FROM journal WHERE event_id = ANY($1::uuid[])"
INSERT_JOURNAL_SQL: Final = """
INSERT INTO journal (index, event_id, type, occurred_at, leaf)
SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::timestamptz[], $5::bytea[])"""
INSERT_POSTINGS_SQL: Final = """
INSERT INTO postings (entry_index, seq, account, debit, credit)
SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::bigint[], $5::bigint[])"""
# Rows are upserted in account order, so that two writers could never wait on each other's rows in a cycle (the
# log_head lock already serialises appends; this keeps the statement safe on its own).
UPSERT_ACCOUNTS_SQL: Final = """
INSERT INTO accounts AS a (account, debits, credits)
SELECT u.account, u.debits, u.credits
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(account, debits, credits)
ORDER BY u.account
ON CONFLICT (account) DO UPDATE
    SET debits = a.debits + EXCLUDED.debits, credits = a.credits + EXCLUDED.credits, updated_at = now()"""
UPSERT_REPORTS_SQL: Final = """
INSERT INTO city_reports AS r (city, year, budget, issued, redeemed, refunded, revoked, expired, outstanding)
SELECT u.* FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[],
                       $8::bigint[], $9::bigint[])
    AS u(city, year, budget, issued, redeemed, refunded, revoked, expired, outstanding)
ORDER BY u.city, u.year
ON CONFLICT (city, year) DO UPDATE SET
    budget = r.budget + EXCLUDED.budget, issued = r.issued + EXCLUDED.issued,
    redeemed = r.redeemed + EXCLUDED.redeemed, refunded = r.refunded + EXCLUDED.refunded,
    revoked = r.revoked + EXCLUDED.revoked, expired = r.expired + EXCLUDED.expired,
    outstanding = r.outstanding + EXCLUDED.outstanding"""
INSERT_VOUCHERS_SQL: Final = """
INSERT INTO vouchers (voucher_id, city, year)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[])
ON CONFLICT (voucher_id) DO NOTHING"""
ADVANCE_HEAD_SQL: Final = "UPDATE log_head SET size = $2 WHERE size = $1 RETURNING size"
INSERT_NODES_SQL: Final = """
INSERT INTO merkle_nodes (level, index, hash) SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::bytea[])"""

# --- the Merkle tree and its checkpoints ------------------------------------------------------------------------------

SUBTREES_SQL: Final = """
SELECT n.level, n.index, n.hash
FROM unnest($1::smallint[], $2::bigint[]) AS w(level, index) JOIN merkle_nodes n USING (level, index)"""
SIGNER_LOCK_KEY: Final = 0x63766C_636B70  # "cvlckp": one checkpoint signer at a time across replicas
TRY_LOCK_SIGNER_SQL: Final = "SELECT pg_try_advisory_xact_lock($1)"
LATEST_CHECKPOINT_SQL: Final = """
SELECT seq, tree_size, root, note, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1"""
INSERT_CHECKPOINT_SQL: Final = """
INSERT INTO checkpoints (seq, tree_size, root, note) VALUES ($1, $2, $3, $4) RETURNING signed_at"""
SIGNED_SIZE_SQL: Final = "SELECT coalesce(max(tree_size), 0) FROM checkpoints"
LIST_CHECKPOINTS_SQL: Final = """
SELECT tree_size, note, signed_at FROM checkpoints WHERE seq >= $1 ORDER BY seq LIMIT $2"""
# What the metrics follow, in one snapshot: the journal's size, the latest checkpoint, and how long ago it was signed
# (or, before the first, how long ago the first entry arrived) by the database's clock.
LOG_STATUS_SQL: Final = """
SELECT h.size, c.tree_size AS signed_size,
       extract(epoch FROM now() - coalesce(c.signed_at, (SELECT appended_at FROM journal WHERE index = 0)))
           AS checkpoint_age_s
FROM log_head h LEFT JOIN LATERAL (
    SELECT tree_size, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1) c ON true"""

# --- reads ------------------------------------------------------------------------------------------------------------

HEAD_SQL: Final = "SELECT size FROM log_head"
GET_ACCOUNT_SQL: Final = "SELECT account, debits, credits FROM accounts WHERE account = $1"
VOUCHER_HOME_SQL: Final = "SELECT city, year FROM vouchers WHERE voucher_id = $1"
# One statement, so the counters and the three account balances come from one snapshot.
GET_REPORT_SQL: Final = """
SELECT r.city, r.year, r.budget, r.issued, r.redeemed, r.refunded, r.revoked, r.expired, r.outstanding,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $3) AS appropriation_balance,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $4) AS budget_balance,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $5) AS lapsed_balance
FROM city_reports r WHERE r.city = $1 AND r.year = $2"""
TRIAL_BALANCE_SQL: Final = """
SELECT coalesce(sum(debits), 0) AS debits, coalesce(sum(credits), 0) AS credits,
       (SELECT size FROM log_head) AS entries
FROM accounts"""
LIST_JOURNAL_SQL: Final = """
SELECT index, event_id::text, type, occurred_at, leaf FROM journal WHERE index >= $1 ORDER BY index LIMIT $2"""
LIST_POSTINGS_SQL: Final = """
SELECT entry_index, account, debit, credit FROM postings
WHERE entry_index BETWEEN $1 AND $2 ORDER BY entry_index, seq"""
# The auditor's page (read in one repeatable-read snapshot, so that reports agree with the balances beside them).
LIST_REPORTS_SQL: Final = """
SELECT city, year, budget, issued, redeemed, refunded, revoked, expired, outstanding
FROM city_reports ORDER BY city, year LIMIT $1"""
BALANCES_SQL: Final = "SELECT account, credits - debits AS balance FROM accounts WHERE account = ANY($1::text[])"
RECENT_ENTRIES_SQL: Final = """
SELECT j.index, j.type, j.occurred_at, n.hash AS leaf_hash
FROM journal j JOIN merkle_nodes n ON n.level = 0 AND n.index = j.index
ORDER BY j.index DESC LIMIT $1"""


class Appended(NamedTuple):
    entries: list[domain.JournalEntry]
    size: int                 # the journal's size after this batch
    duplicates: int           # events already journaled (skipped)
    rejected: list[tuple[Delivered, domain.InvalidEvent]]  # kept in dead_letters


async def append(conn: asyncpg.Connection, batch: list[Delivered]) -> Appended:
    """Journal a consumer batch, in delivery order, at the end of the log, in the caller's transaction.

    Invariants: indexes are contiguous from the log's size (the log_head row lock, taken first, serialises appends
    across replicas); each entry balances and so does the batch; accounts, city reports, voucher homes and the
    Merkle tree's new subtrees (grow_tree) are written in the same transaction as the entries, so the tree always
    covers exactly the journal. An event id already in the journal is skipped: the consumer's
    processed_events should never hand one over again, but the journal does not rely on it.
    """
    assert conn.is_in_transaction(), "the journal must be written in the consumer's transaction"
    size = await conn.fetchval(LOCK_HEAD_SQL)
    assert size is not None and size >= 0
    journaled = {r[0] for r in await conn.fetch(JOURNALED_SQL, [d.event.event_id for d in batch])}

    entries: list[domain.JournalEntry] = []
    rejected: list[tuple[Delivered, domain.InvalidEvent]] = []
    accounts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # account -> [debits, credits]
    reports: dict[domain.CityYear, list[int]] = {}
    homes: dict[str, domain.CityYear] = {}
    duplicates = 0
    for d in batch:
        if d.event.event_id in journaled:
            duplicates += 1
            continue
        journaled.add(d.event.event_id)
        try:
            entry = domain.journal_entry(size + len(entries), d.event)
        except domain.InvalidEvent as exc:
            rejected.append((d, exc))
            continue
        entries.append(entry)
        for p in entry.postings:
            accounts[p.account][0] += p.debit
            accounts[p.account][1] += p.credit
        if (report := domain.report_delta(d.event, entry.postings)) is not None:
            key, delta = report
            row = reports.setdefault(key, [0] * len(delta))
            for i, value in enumerate(delta):
                row[i] += value
        if (home := domain.voucher_home(d.event)) is not None:
            homes.setdefault(*home)

    for d, exc in rejected:
        await conn.execute(DEAD_LETTER_SQL, d.topic, d.partition, d.offset, encode_event(d.event), str(exc))
    if not entries:
        return Appended([], size, duplicates, rejected)

    assert [e.index for e in entries] == list(range(size, size + len(entries)))
    assert sum(a[0] for a in accounts.values()) == sum(a[1] for a in accounts.values()), "the batch does not balance"

    await conn.execute(INSERT_JOURNAL_SQL, [e.index for e in entries], [e.event_id for e in entries],
                       [e.type for e in entries], [e.occurred_at for e in entries], [e.leaf for e in entries])
    rows = [(e.index, seq, p) for e in entries for seq, p in enumerate(e.postings)]
    if rows:
        await conn.execute(INSERT_POSTINGS_SQL, [r[0] for r in rows], [r[1] for r in rows],
                           [r[2].account for r in rows], [r[2].debit for r in rows], [r[2].credit for r in rows])
    if accounts:
        names = sorted(accounts)
        await conn.execute(UPSERT_ACCOUNTS_SQL, names, [accounts[n][0] for n in names],
                           [accounts[n][1] for n in names])
    if reports:
        keys = sorted(reports)
        columns = list(zip(*(reports[k] for k in keys)))
        await conn.execute(UPSERT_REPORTS_SQL, [k.city for k in keys], [k.year for k in keys], *map(list, columns))
    if homes:
        ids = sorted(homes)
        await conn.execute(INSERT_VOUCHERS_SQL, ids, [homes[i].city for i in ids], [homes[i].year for i in ids])
    await grow_tree(conn, size, (e.leaf for e in entries))
    new_size = size + len(entries)
    advanced = await conn.fetchval(ADVANCE_HEAD_SQL, size, new_size)
    assert advanced == new_size, "the log head moved while it was locked"
    return Appended(entries, new_size, duplicates, rejected)


async def grow_tree(conn: asyncpg.Connection, size: int, leaves: Iterable[bytes]) -> None:
    """Add `leaves` at `size` to the stored Merkle tree, inside the append's transaction (log_head locked).

    Reads the old tree's O(log n) frontier; writes the leaf hashes and every complete subtree they complete. A
    missing frontier node means the tree does not cover the journal: the append fails rather than fork the tree.
    """
    assert conn.is_in_transaction()
    get = await subtree_getter(conn, merkle.root_subtrees(size))
    nodes = merkle.grow(size, [merkle.leaf_hash(leaf) for leaf in leaves], get)
    await conn.execute(INSERT_NODES_SQL, [n.level for n in nodes], [n.index for n in nodes], [n.hash for n in nodes])


class MissingSubtree(LookupError):
    """A complete subtree the tree must have is not stored: the tree and the journal disagree."""


async def subtree_getter(conn: asyncpg.Connection | asyncpg.Pool,
                         needed: list[merkle.Subtree]) -> merkle.SubtreeHash:
    """One read of the complete subtrees `needed` (O(log n) of them), as the lookup merkle's functions take."""
    if not needed:
        return _no_subtree
    rows = await conn.fetch(SUBTREES_SQL, [s.level for s in needed], [s.index for s in needed])
    hashes = {(r["level"], r["index"]): bytes(r["hash"]) for r in rows}
    if len(hashes) != len(set(needed)):
        missing = next(s for s in needed if (s.level, s.index) not in hashes)
        raise MissingSubtree(f"the Merkle tree has no node at level {missing.level}, index {missing.index}")
    return lambda level, index: hashes[(level, index)]


def _no_subtree(level: int, index: int) -> bytes:
    raise AssertionError(f"subtree ({level}, {index}) was not read")


class InconsistentLog(Exception):
    """The tree as stored does not extend the latest signed checkpoint: nothing is signed."""


class Signed(NamedTuple):
    seq: int
    tree_size: int
    root: bytes
    signed_at: dt.datetime


async def sign_checkpoint(conn: asyncpg.Connection, key: notes.LogKey) -> Signed | None:
    """Sign a checkpoint of the whole journal when it grew since the latest one; None when there is nothing to do.

    Invariants: one signer at a time across replicas (a transaction advisory lock; the others skip this round); tree
    sizes strictly increase; a new checkpoint is signed only after a consistency proof from the latest signed one
    (its root taken from its verified note, not from a column) verifies against the new root (InconsistentLog if
    not). The journal's size and the tree's nodes are committed together, so the size read here is fully covered.
    """
    assert conn.is_in_transaction()
    if not await conn.fetchval(TRY_LOCK_SIGNER_SQL, SIGNER_LOCK_KEY):
        return None
    size = await conn.fetchval(HEAD_SQL)
    latest = await conn.fetchrow(LATEST_CHECKPOINT_SQL)
    signed_size = latest["tree_size"] if latest else 0
    if size == signed_size:
        return None
    if size < signed_size:
        raise InconsistentLog(f"the journal has {size} entries, fewer than the {signed_size} of the latest checkpoint")
    needed = merkle.root_subtrees(size) + (merkle.consistency_subtrees(signed_size, size) if latest else [])
    get = await subtree_getter(conn, needed)
    root = merkle.root(size, get)
    if latest:
        previous = notes.open_note(latest["note"], key)
        if (previous.origin, previous.size) != (key.name, signed_size):
            raise InconsistentLog(f"checkpoint {latest['seq']} says {previous.origin} {previous.size}, "
                                  f"stored as {key.name} {signed_size}")
        try:
            merkle.verify_consistency(signed_size, size, previous.root, root,
                                      merkle.consistency_proof(signed_size, size, get))
        except merkle.ProofError as exc:
            raise InconsistentLog(f"tree size {size} is not consistent with checkpoint {signed_size}: {exc}") from exc
    seq = latest["seq"] + 1 if latest else 0
    note = key.sign(notes.checkpoint_body(key.name, size, root))
    signed_at = await conn.fetchval(INSERT_CHECKPOINT_SQL, seq, size, root, note)
    return Signed(seq, size, root, signed_at)


# --- views ------------------------------------------------------------------------------------------------------------

def account_view(row: asyncpg.Record) -> Account:
    return Account(account=row["account"], debits=row["debits"], credits=row["credits"],
                   balance=row["credits"] - row["debits"])


def report_view(row: asyncpg.Record | dict) -> CityReport:
    """The report, checked against the accounts it summarises (all read in one snapshot).

    - outstanding, summed from voucher:/hold: postings, equals issued − redeemed + refunded − revoked − expired;
    - the appropriation's balance is minus the budget set;
    - available (the budget account) plus lapsed equals budget − issued + revoked + expired.
    """
    appropriation = row["appropriation_balance"] or 0
    available = row["budget_balance"] or 0
    lapsed = row["lapsed_balance"] or 0
    report = CityReport(city=row["city"], year=row["year"], budget=row["budget"], issued=row["issued"],
                        redeemed=row["redeemed"], refunded=row["refunded"], revoked=row["revoked"],
                        expired=row["expired"], outstanding=row["outstanding"], available=available)
    assert report.outstanding == (report.issued - report.redeemed + report.refunded - report.revoked
                                  - report.expired), report
    assert appropriation == -report.budget, (appropriation, report)
    assert available + lapsed == report.budget - report.issued + report.revoked + report.expired, (lapsed, report)
    return report


def trial_balance_view(row: asyncpg.Record) -> TrialBalance:
    balance = TrialBalance(debits=int(row["debits"]), credits=int(row["credits"]), entries=row["entries"])
    assert balance.debits == balance.credits, balance
    return balance


def entries_view(journal: list[asyncpg.Record], postings: list[asyncpg.Record]) -> list[Entry]:
    """Entries as stored: the leaf is served as written, so an auditor's verifier, not this server, judges it."""
    by_entry: dict[int, list[Posting]] = defaultdict(list)
    for p in postings:
        by_entry[p["entry_index"]].append(Posting(account=p["account"], debit=p["debit"], credit=p["credit"]))
    return [Entry(index=j["index"], event_id=j["event_id"], type=j["type"], occurred_at=j["occurred_at"],
                  postings=by_entry.get(j["index"], []), leaf=base64.b64encode(j["leaf"]).decode("ascii"))
            for j in journal]


async def page_data(conn: asyncpg.Connection, reports_max: int, entries_max: int) -> page.PageData:
    """What the auditor's page shows; call it in one repeatable-read transaction so every figure is one snapshot.

    The reports are the same views (with the same checks) as GET /v1/reports/cities/{city}/{year}.
    """
    assert conn.is_in_transaction()
    rows = await conn.fetch(LIST_REPORTS_SQL, reports_max + 1)
    rows, truncated = rows[:reports_max], len(rows) > reports_max
    names = [name for r in rows for name in (domain.appropriation(r["city"], r["year"]),
                                              domain.budget(r["city"], r["year"]), domain.lapsed(r["city"], r["year"]))]
    balances = {b["account"]: b["balance"] for b in await conn.fetch(BALANCES_SQL, names)} if names else {}
    reports = [report_view({**r, "appropriation_balance": balances.get(domain.appropriation(r["city"], r["year"])),
                            "budget_balance": balances.get(domain.budget(r["city"], r["year"])),
                            "lapsed_balance": balances.get(domain.lapsed(r["city"], r["year"]))})
               for r in rows]
    size = await conn.fetchval(HEAD_SQL)
    latest = await conn.fetchrow(LATEST_CHECKPOINT_SQL)
    checkpoint = (page.PageCheckpoint(latest["tree_size"], latest["note"], latest["signed_at"])
                  if latest else None)
    entries = [page.PageEntry(e["index"], e["type"], e["occurred_at"], bytes(e["leaf_hash"]))
               for e in await conn.fetch(RECENT_ENTRIES_SQL, entries_max)]
    return page.PageData(reports=reports, reports_truncated=truncated, journal_size=size, checkpoint=checkpoint,
                         entries=entries, verifier_key="", base_url="")
