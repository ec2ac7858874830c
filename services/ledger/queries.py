"""Ledger reads: one function per thing a handler (or a command) reads, each one statement or one snapshot.

They raise the domain's NotFound when there is nothing to show, and return the response Structs; SQL and row mapping
come from store.py, proofs from merkle.py, the page's figures go to page.py. No HTTP here.
"""
from __future__ import annotations

from typing import NamedTuple

import asyncpg

from schemas.ledger import (
    Account, Checkpoints, CityReport, ConsistencyProof, Entries, InclusionProof, TrialBalance,
)

from schemas.common import DEFAULT_PROGRAM

from services.common.errors import NotFound

from . import chart, cities, domain, merkle, page, store

Reader = asyncpg.Connection | asyncpg.Pool


# --- the Merkle tree --------------------------------------------------------------------------------------------------

class MissingSubtree(LookupError):
    """A complete subtree the tree must have is not stored: the tree and the journal disagree."""


async def subtree_getter(conn: Reader, needed: list[merkle.Subtree]) -> merkle.SubtreeHash:
    """One read of the tiles that hold the complete subtrees `needed` (O(log n) tiles), as the lookup merkle's
    functions take.

    A subtree its tile does not hold (no tile, or a partial tile too short) raises MissingSubtree here, before any
    hash is computed from a partial tree.
    """
    if not needed:
        return _no_subtree
    tiles = merkle.tiles_of(needed)
    rows = await conn.fetch(store.TILES_SQL, [t[0] for t in tiles], [t[1] for t in tiles])
    stored = {(r["level"], r["index"]): bytes(r["hashes"]) for r in rows}
    for s in needed:
        tile_level, tile_index, first, count = merkle.tile_position(*s)
        if len(stored.get((tile_level, tile_index), b"")) < (first + count) * merkle.HASH_SIZE:
            raise MissingSubtree(f"the Merkle tree has no node at level {s.level}, index {s.index} "
                                 f"(tile {tile_level}/{tile_index})")
    return merkle.tile_getter(stored)


def _no_subtree(level: int, index: int) -> bytes:
    raise AssertionError(f"subtree ({level}, {index}) was not read")


async def _require_signed(pool: asyncpg.Pool, name: str, size: int) -> None:
    """NotFound unless tree size `size` (parameter `name`) is covered by a signed checkpoint."""
    signed = await pool.fetchval(store.SIGNED_SIZE_SQL)
    if size > signed:
        raise NotFound(f"parameter {name}: no checkpoint covers tree size {size} yet"
                       + (f"; the latest is of size {signed}" if signed else "; none has been signed yet"))


async def inclusion_proof(pool: asyncpg.Pool, index: int, tree_size: int) -> InclusionProof:
    """RFC 9162 §2.1.3.1 proof of entry `index` in a signed tree of `tree_size` leaves (index < tree_size)."""
    assert 0 <= index < tree_size, (index, tree_size)
    await _require_signed(pool, "tree_size", tree_size)
    get = await subtree_getter(pool, merkle.inclusion_subtrees(index, tree_size))
    path = merkle.inclusion_proof(index, tree_size, get)
    return InclusionProof(index=index, tree_size=tree_size, leaf_hash=store.b64(get(0, index)),
                          path=[store.b64(h) for h in path])


async def consistency_proof(pool: asyncpg.Pool, first: int, second: int) -> ConsistencyProof:
    """RFC 9162 §2.1.4.1 proof from tree size `first` to a signed `second` (first <= second)."""
    assert 0 < first <= second, (first, second)
    await _require_signed(pool, "second", second)
    get = await subtree_getter(pool, merkle.consistency_subtrees(first, second))
    path = merkle.consistency_proof(first, second, get)
    return ConsistencyProof(first=first, second=second, path=[store.b64(h) for h in path])


class LogStatus(NamedTuple):
    size: int                         # entries in the journal
    signed_size: int                  # the latest checkpoint's tree size (0 before the first)
    checkpoint_age_s: float | None    # since it was signed (before the first: since the first entry); None if empty


async def log_status(pool: asyncpg.Pool) -> LogStatus:
    """The journal's size and the latest checkpoint, in one snapshot, by the database's clock."""
    row = await pool.fetchrow(store.LOG_STATUS_SQL)
    age_s = row["checkpoint_age_s"]
    return LogStatus(row["size"], row["signed_size"] or 0, None if age_s is None else float(age_s))


async def latest_note(pool: asyncpg.Pool) -> str:
    """The latest checkpoint's note with every cosignature collected for it (CONTRACT.md "Witnessed checkpoints")."""
    row = await pool.fetchrow(store.LATEST_NOTE_SQL)
    if row is None:
        raise NotFound("no checkpoint has been signed yet: the journal is empty")
    return row["note"]


async def checkpoints(pool: asyncpg.Pool, start: int, limit: int) -> Checkpoints:
    rows = await pool.fetch(store.LIST_CHECKPOINTS_SQL, start, limit)
    return Checkpoints(checkpoints=[store.checkpoint_view(r) for r in rows])


# --- the journal and its accounts -------------------------------------------------------------------------------------

async def account(pool: asyncpg.Pool, name: str) -> Account:
    row = await pool.fetchrow(store.GET_ACCOUNT_SQL, name)
    if row is None:
        raise NotFound(f"account {name} has never moved")
    return store.account_view(row)


async def voucher_city(pool: asyncpg.Pool, account_name: str, voucher_id: str) -> str:
    """The city of the voucher a voucher: or hold: account belongs to (NotFound before the account moved)."""
    home = await pool.fetchrow(store.VOUCHER_HOME_SQL, account_name)
    if home is None or home["city"] is None:
        raise NotFound(f"account {account_name} has never moved")
    return home["city"]


async def city_report(pool: asyncpg.Pool, city: str, year: int, program: str = DEFAULT_PROGRAM) -> CityReport:
    row = await pool.fetchrow(store.GET_REPORT_SQL, city, year, program, domain.appropriation(city, year, program),
                              domain.budget(city, year, program), domain.lapsed(city, year, program))
    if row is None:
        raise NotFound(f"the ledger has no event for {city} {year}"
                       + ("" if program == DEFAULT_PROGRAM else f" program {program}"))
    return store.report_view(row)


async def trial_balance(pool: asyncpg.Pool) -> TrialBalance:
    return store.trial_balance_view(await pool.fetchrow(store.TRIAL_BALANCE_SQL))


async def entries(pool: asyncpg.Pool, start: int, limit: int) -> Entries:
    rows = await pool.fetch(store.LIST_JOURNAL_SQL, start, limit)
    # Committed entries never change, so the postings of exactly these entries can be read in a second statement.
    postings = await pool.fetch(store.LIST_POSTINGS_SQL, rows[0]["index"], rows[-1]["index"]) if rows else []
    return Entries(entries=store.entries_view(rows, postings))


# --- every report: the auditor's page and the budget gauges ----------------------------------------------------------

async def _reports(conn: asyncpg.Connection, reports_max: int) -> tuple[list[CityReport], bool]:
    """The first `reports_max` reports (by city, year, program), each checked against its accounts (report_view),
    and whether there were more. Call it inside one snapshot."""
    rows = await conn.fetch(store.LIST_REPORTS_SQL, reports_max + 1)
    return await _report_views(conn, rows, reports_max)


async def _report_views(conn: asyncpg.Connection, rows: list, reports_max: int) -> tuple[list[CityReport], bool]:
    """The first `reports_max` of report rows read with one more than that, with their accounts' balances."""
    rows, truncated = rows[:reports_max], len(rows) > reports_max
    keys = [(r["city"], r["year"], r["program"]) for r in rows]
    names = [name for k in keys for name in (domain.appropriation(*k), domain.budget(*k), domain.lapsed(*k))]
    balances = {b["account"]: b["balance"] for b in await conn.fetch(store.BALANCES_SQL, names)} if names else {}
    reports = [store.report_view({
        **r, "appropriation_balance": balances.get(domain.appropriation(*k)),
        "budget_balance": balances.get(domain.budget(*k)),
        "lapsed_balance": balances.get(domain.lapsed(*k))}) for r, k in zip(rows, keys)]
    return reports, truncated


async def budget_reports(pool: asyncpg.Pool, reports_max: int) -> tuple[list[CityReport], bool]:
    """Every budget's report (up to `reports_max`), read in one snapshot: what the budget gauges show."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        return await _reports(conn, reports_max)


# --- the auditor's page -----------------------------------------------------------------------------------------------

async def page_data(pool: asyncpg.Pool, reports_max: int, entries_max: int, *, verifier_key: str,
                    base_url: str, checkpoints_max: int = 0) -> page.PageData:
    """What the auditor's page shows, read in one repeatable-read snapshot so every figure agrees with the others.

    The reports, one per (city, year, program), are the same views (with the same checks) as
    GET /v1/reports/cities/{city}/{year}?program=.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        reports, truncated = await _reports(conn, reports_max)
        size = await conn.fetchval(store.HEAD_SQL)
        latest = await conn.fetchrow(store.LATEST_CHECKPOINT_SQL)
        recent = await conn.fetch(store.RECENT_ENTRIES_SQL, entries_max)
        history = await conn.fetch(cities.RECENT_CHECKPOINTS_SQL, checkpoints_max) if checkpoints_max else []
        names = await _city_names(conn, sorted({r.city for r in reports}))
    checkpoint = (page.PageCheckpoint(latest["tree_size"], latest["note"], latest["signed_at"])
                  if latest else None)
    return page.PageData(reports=reports, reports_truncated=truncated, journal_size=size, checkpoint=checkpoint,
                         entries=[page.PageEntry(e["index"], e["type"], e["occurred_at"], bytes(e["leaf_hash"]))
                                  for e in recent],
                         verifier_key=verifier_key, base_url=base_url,
                         checkpoints=[page.PageCheckpointRow(c["seq"], c["tree_size"], bytes(c["root"]),
                                                             c["signed_at"], c["cosignatures"]) for c in history],
                         names=names)


# --- queries by account (CONTRACT.md, "Queries") ----------------------------------------------------------------------

class AccountPage(NamedTuple):
    entries: list
    last: int | None      # the position to go on from (an entry index), None when the account has no more


async def account_entries(pool: asyncpg.Pool, name: str, after: int, start, end, limit: int,
                          scan_max: int) -> AccountPage:
    """Entries touching account `name` with index > `after` and occurred_at in [start, end) (None: unbounded),
    oldest first, at most `limit`, each with all its postings and its leaf.

    Bounded whatever the period: at most `scan_max` of the account's entries are read per page (without a period,
    `limit` + 1 are: one more tells whether there is more). A page cut by that bound has fewer entries than asked
    for and a position to go on from.
    """
    filtered = start is not None or end is not None
    scan = scan_max if filtered else limit + 1
    row = await pool.fetchrow(store.ACCOUNT_ENTRIES_SQL, name, after, scan, start, end, limit + 1)
    hits = list(row["hits"])
    if len(hits) > limit:
        hits, last = hits[:limit], hits[limit - 1]
    elif row["scanned"] >= scan and filtered:
        last = row["last_scanned"]
    else:
        last = None
    if not hits:
        return AccountPage([], last)
    journal = await pool.fetch(store.JOURNAL_AT_SQL, hits)
    postings = await pool.fetch(store.POSTINGS_AT_SQL, hits)
    entries = store.entries_view(journal, postings)
    assert [e.index for e in entries] == hits, "committed entries are never removed"
    assert all(any(p.account == name for p in e.postings) for e in entries), "each entry touches the account"
    return AccountPage(entries, last)


async def account_exists(pool: asyncpg.Pool, name: str) -> bool:
    return await pool.fetchval(store.ACCOUNT_MOVED_SQL, name)


async def account_at(pool: asyncpg.Pool, name: str, tree_size: int) -> tuple[int, int] | None:
    """(debits, credits) of account `name` over entries 0 .. tree_size-1; None when tree_size is beyond the
    journal. NotFound for an account that has never moved."""
    size = await pool.fetchval(store.HEAD_SQL)
    if tree_size > size:
        return None
    if not await account_exists(pool, name):
        raise NotFound(f"account {name} has never moved")
    # Whichever side of tree_size holds fewer of the journal's entries (and so, roughly, of the account's postings).
    if 2 * tree_size >= size:
        row = await pool.fetchrow(store.ACCOUNT_SUFFIX_SQL, name, tree_size)
    else:
        row = await pool.fetchrow(store.ACCOUNT_PREFIX_SQL, name, tree_size)
    debits, credits = int(row["debits"]), int(row["credits"])
    assert debits >= 0 and credits >= 0, (name, tree_size, debits, credits)
    return debits, credits


# --- a city's page (the auditor's pages) ------------------------------------------------------------------------------

async def _city_names(conn: asyncpg.Connection, city_ids: list[str]) -> dict[str, page.CityName]:
    rows = await conn.fetch(cities.NAMES_SQL, city_ids) if city_ids else []
    return {r["city"]: page.CityName(r["name"], r["currency"]) for r in rows}


async def city_page_data(pool: asyncpg.Pool, city: str, *, reports_max: int, entries_max: int, window_max: int,
                         buckets: int, base_url: str) -> page.CityPageData | None:
    """A city's page, read in one repeatable-read snapshot: its reports (as GET /v1/reports/cities/{city}/{year}
    shows each), and its entries among the journal's latest `window_max` (cities.CITY_WINDOW_SQL), the most recent
    `entries_max` of them listed and all of them bucketed into the chart. None for a city the ledger knows nothing of.

    Bounded whatever the journal's size: the window is read through the postings' primary key from its first index.
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        reports, truncated = await _report_views(conn, await conn.fetch(cities.CITY_REPORTS_SQL, city,
                                                                        reports_max + 1), reports_max)
        names = await _city_names(conn, [city])
        size = await conn.fetchval(store.HEAD_SQL)
        signed = await conn.fetchval(store.SIGNED_SIZE_SQL)
        start = max(0, size - window_max)
        window = await conn.fetch(cities.CITY_WINDOW_SQL, city, start)
    if not reports and not names and not window:
        return None
    now = (sum(r.issued for r in reports), sum(r.redeemed for r in reports), sum(r.available for r in reports))
    deltas = [chart.Delta(w["occurred_at"], w["issued"], w["redeemed"], w["available"]) for w in window]
    return page.CityPageData(
        city=city, name=names.get(city), reports=reports, reports_truncated=truncated,
        entries=[page.PageEntry(w["index"], w["type"], w["occurred_at"], bytes(w["leaf_hash"]))
                 for w in reversed(window[-entries_max:])],
        # With more budgets than shown, the reports' sums are not the city's: no chart rather than a wrong one.
        chart=[] if truncated else chart.points(now, deltas, buckets),
        window_start=start, journal_size=size, signed_size=signed, base_url=base_url)
