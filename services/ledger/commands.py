"""Ledger commands: each locks what it changes, decides with domain.py (and merkle.py, notes.py), writes with
store.py's statements, and returns what happened. No HTTP here; metrics and logs are the caller's.

- `journal`: one consumer batch of events becomes journal entries (the consumer's handler, in its transaction);
- `sign_checkpoint`: a signed checkpoint of the whole journal, when it grew (one signing round).

The ledger produces no events, so no command writes an outbox.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import NamedTuple

import asyncpg

from schemas.events import encode_event

from services.common.consumer import DEAD_LETTER_SQL, Delivered

from . import domain, merkle, notes, queries, store


# --- the journal ------------------------------------------------------------------------------------------------------

class Journaled(NamedTuple):
    entries: list[domain.JournalEntry]
    size: int                 # the journal's size after this batch
    duplicates: int           # events already journaled (skipped)
    rejected: list[tuple[Delivered, domain.InvalidEvent]]  # kept in dead_letters


async def journal(conn: asyncpg.Connection, batch: list[Delivered]) -> Journaled:
    """Journal a consumer batch, in delivery order, at the end of the log, in the caller's transaction.

    Invariants: indexes are contiguous from the log's size (the log_head row lock, taken first, serialises appends
    across replicas); each entry balances and so does the batch; accounts, city reports, voucher homes and the
    Merkle tree's new subtrees are written in the same transaction as the entries, so the tree always covers exactly
    the journal. An event id already in the journal is skipped: the consumer's processed_events should never hand
    one over again, but the journal does not rely on it.
    """
    assert conn.is_in_transaction(), "the journal must be written in the consumer's transaction"
    size = await conn.fetchval(store.LOCK_HEAD_SQL)
    assert size is not None and size >= 0
    events = [d.event for d in batch]
    journaled = {r[0] for r in await conn.fetch(store.JOURNALED_SQL, [e.event_id for e in events])}
    decided = domain.journal_batch(size, events, journaled)

    rejected = [(batch[position], exc) for position, exc in decided.rejected]
    for d, exc in rejected:
        await conn.execute(DEAD_LETTER_SQL, d.topic, d.partition, d.offset, encode_event(d.event), str(exc))
    entries = decided.entries
    if not entries:
        return Journaled([], size, decided.duplicates, rejected)

    await conn.execute(store.INSERT_JOURNAL_SQL, [e.index for e in entries], [e.event_id for e in entries],
                       [e.type for e in entries], [e.occurred_at for e in entries], [e.leaf for e in entries])
    rows = [(e.index, seq, p) for e in entries for seq, p in enumerate(e.postings)]
    if rows:
        await conn.execute(store.INSERT_POSTINGS_SQL, [r[0] for r in rows], [r[1] for r in rows],
                           [r[2].account for r in rows], [r[2].debit for r in rows], [r[2].credit for r in rows])
    if decided.accounts:
        names = sorted(decided.accounts)
        await conn.execute(store.UPSERT_ACCOUNTS_SQL, names, [decided.accounts[n].debits for n in names],
                           [decided.accounts[n].credits for n in names])
    if decided.reports:
        keys = sorted(decided.reports)
        columns = list(zip(*(decided.reports[k] for k in keys)))
        await conn.execute(store.UPSERT_REPORTS_SQL, [k.city for k in keys], [k.year for k in keys],
                           [k.program for k in keys], *map(list, columns))
    if decided.homes:
        ids = sorted(decided.homes)
        await conn.execute(store.INSERT_VOUCHERS_SQL, ids, [decided.homes[i].city for i in ids],
                           [decided.homes[i].year for i in ids], [decided.homes[i].program for i in ids])
    await _grow_tree(conn, size, (e.leaf for e in entries))
    new_size = size + len(entries)
    advanced = await conn.fetchval(store.ADVANCE_HEAD_SQL, size, new_size)
    assert advanced == new_size, "the log head moved while it was locked"
    return Journaled(entries, new_size, decided.duplicates, rejected)


async def _grow_tree(conn: asyncpg.Connection, size: int, leaves: Iterable[bytes]) -> None:
    """Add `leaves` at `size` to the stored Merkle tree, inside the journal's transaction (log_head locked).

    Reads the old tree's O(log n) frontier; writes the leaf hashes and every complete subtree they complete. A
    missing frontier node means the tree does not cover the journal: the batch fails rather than fork the tree.
    """
    assert conn.is_in_transaction()
    get = await queries.subtree_getter(conn, merkle.root_subtrees(size))
    nodes = merkle.grow(size, [merkle.leaf_hash(leaf) for leaf in leaves], get)
    await conn.execute(store.INSERT_NODES_SQL, [n.level for n in nodes], [n.index for n in nodes],
                       [n.hash for n in nodes])


# --- checkpoints ------------------------------------------------------------------------------------------------------

class InconsistentLog(Exception):
    """The tree as stored does not extend the latest signed checkpoint: nothing is signed."""


class Signed(NamedTuple):
    seq: int
    tree_size: int
    root: bytes
    signed_at: dt.datetime


async def sign_checkpoint(pool: asyncpg.Pool, key: notes.LogKey) -> Signed | None:
    """Sign a checkpoint of the whole journal when it grew since the latest one; None when there is nothing to do.

    Invariants: one signer at a time across replicas (a transaction advisory lock; the others skip this round); tree
    sizes strictly increase; a new checkpoint is signed only after a consistency proof from the latest signed one
    (its root taken from its verified note, not from a column) verifies against the new root (InconsistentLog if
    not). The journal's size and the tree's nodes are committed together, so the size read here is fully covered.
    """
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(store.TRY_LOCK_SIGNER_SQL, store.SIGNER_LOCK_KEY):
            return None
        size = await conn.fetchval(store.HEAD_SQL)
        latest = await conn.fetchrow(store.LATEST_CHECKPOINT_SQL)
        signed_size = latest["tree_size"] if latest else 0
        if size == signed_size:
            return None
        if size < signed_size:
            raise InconsistentLog(f"the journal has {size} entries, fewer than the {signed_size} of the latest "
                                  f"checkpoint")
        needed = merkle.root_subtrees(size) + (merkle.consistency_subtrees(signed_size, size) if latest else [])
        get = await queries.subtree_getter(conn, needed)
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
                raise InconsistentLog(f"tree size {size} is not consistent with checkpoint {signed_size}: "
                                      f"{exc}") from exc
        seq = latest["seq"] + 1 if latest else 0
        note = key.sign(notes.checkpoint_body(key.name, size, root))
        signed_at = await conn.fetchval(store.INSERT_CHECKPOINT_SQL, seq, size, root, note)
        return Signed(seq, size, root, signed_at)
