"""Ledger commands: each locks what it changes, decides with domain.py (and merkle.py, notes.py), writes with
store.py's statements, and returns what happened. No HTTP here; metrics and logs are the caller's.

- `journal`: one consumer batch of events becomes journal entries (the consumer's handler, in its transaction);
- `sign_checkpoint`: a signed checkpoint of the whole journal, when it grew (one signing round).

The ledger produces no events, so no command writes an outbox.
"""
from __future__ import annotations

import datetime as dt
from typing import NamedTuple

import asyncpg

from schemas.events import encode_event
from schemas.limits import LEDGER_COPY_ENTRIES_MIN

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
    edge = merkle.edge_tiles(size)
    read = await conn.fetchrow(store.JOURNALED_AND_EDGE_SQL, [e.event_id for e in events],
                               [t[0] for t in edge], [t[1] for t in edge])
    decided = domain.journal_batch(size, events, set(read["journaled"]))

    rejected = [(batch[position], exc) for position, exc in decided.rejected]
    for d, exc in rejected:
        await conn.execute(DEAD_LETTER_SQL, d.topic, d.partition, d.offset, encode_event(d.event), str(exc))
    entries = decided.entries
    if not entries:
        return Journaled([], size, decided.duplicates, rejected)

    new_size = size + len(entries)
    tiles = _grow_tree(size, edge, read["edge"], [e.leaf for e in entries])
    names = sorted(decided.accounts)
    keys = sorted(decided.reports)
    report_columns = [list(c) for c in zip(*(decided.reports[k] for k in keys))] or [[]] * len(domain.ReportDelta._fields)
    # A voucher: or hold: account's home: the (city, year, program) of its voucher (None for the other accounts).
    homes = decided.homes
    account_homes = [homes.get(n[n.index(":") + 1:]) if n[0] in "vh" else None for n in names]
    args = [size, new_size,
            names, [decided.accounts[n].debits for n in names], [decided.accounts[n].credits for n in names],
            [k.city for k in keys], [k.year for k in keys], [k.program for k in keys], *report_columns,
            [h and h.city for h in account_homes], [h and h.year for h in account_homes],
            [h and h.program for h in account_homes],
            [t.level for t in tiles], [t.index for t in tiles], [t.hashes for t in tiles]]
    journal_rows = [(e.index, e.event_id, e.type, e.occurred_at, e.leaf) for e in entries]
    posting_rows = [(e.index, seq, p.account, p.debit, p.credit) for e in entries for seq, p in enumerate(e.postings)]
    if len(entries) >= LEDGER_COPY_ENTRIES_MIN:
        await conn.copy_records_to_table(store.JOURNAL_TABLE, records=journal_rows, columns=store.JOURNAL_COLUMNS)
        if posting_rows:
            await conn.copy_records_to_table(store.POSTINGS_TABLE, records=posting_rows,
                                             columns=store.POSTINGS_COLUMNS)
        written = await conn.fetchrow(store.WRITE_SQL, *args)
    else:
        written = await conn.fetchrow(store.WRITE_WITH_ENTRIES_SQL, *args,
                                      *(list(c) for c in zip(*journal_rows)),
                                      *([list(c) for c in zip(*posting_rows)] or [[]] * len(store.POSTINGS_COLUMNS)))
    assert written["size"] == new_size, "the log head moved while it was locked"
    if written["tiles"] != len(tiles):
        raise queries.MissingSubtree(f"a stored Merkle tile disagrees with the tree of {size} entries grown by "
                                     f"{len(entries)}: the batch is not journaled")
    return Journaled(entries, new_size, decided.duplicates, rejected)


def _grow_tree(size: int, edge: list[tuple[int, int]], stored: list[bytes | None],
               leaves: list[bytes]) -> list[merkle.Tile]:
    """The tiles that adding `leaves` at `size` changes, from the old tree's right edge as read in the journal's
    transaction (log_head locked). An edge tile missing, or not holding exactly the hashes a tree of `size` has
    there, means the tree does not cover the journal: the batch fails rather than fork the tree.
    """
    tiles: dict[tuple[int, int], bytes] = {}
    for (tile_level, tile_index), hashes in zip(edge, stored, strict=True):
        width = merkle.tile_width(size, tile_level, tile_index)
        if hashes is None or len(hashes) != width * merkle.HASH_SIZE:
            raise queries.MissingSubtree(f"the Merkle tree's tile {tile_level}/{tile_index} does not hold the "
                                         f"{width} hashes of a tree of {size} leaves")
        tiles[(tile_level, tile_index)] = bytes(hashes)
    return merkle.grow_tiles(size, [merkle.leaf_hash(leaf) for leaf in leaves], tiles)


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
