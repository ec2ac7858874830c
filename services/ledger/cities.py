"""What the auditor's pages read beyond the reports: city names (the latest CitySet journaled per city), a city's
reports, its share of the journal's latest entries (for its recent entries and its chart), and the checkpoint
history. Named, parameterised statements, plus the one write: `record_names`, which the journal's consumer calls in
the transaction that journals the batch.

A city's entries are found in a bounded window, the journal's latest CITY_WINDOW_ENTRIES_MAX entries, never by a scan
of the whole journal: an entry is the city's when one of its postings is on a city-year account of the city
(`appropriation|budget|lapsed:{city}:…`) or on a `voucher:`/`hold:` account of a voucher whose home is the city. An
entry without postings (CitySet, ProgramSet, BudgetCarried, BudgetReturned) belongs to no city here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from schemas import events as ev

from services.common.consumer import Delivered

from . import domain

# --- city names -------------------------------------------------------------------------------------------------------

# A later entry replaces an earlier one only (the batch holds one row per city: its latest CitySet).
RECORD_NAMES_SQL: Final = """
INSERT INTO city_names AS n (city, name, currency, entry_index, occurred_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::timestamptz[])
ON CONFLICT (city) DO UPDATE SET name = EXCLUDED.name, currency = EXCLUDED.currency,
    entry_index = EXCLUDED.entry_index, occurred_at = EXCLUDED.occurred_at
WHERE n.entry_index < EXCLUDED.entry_index"""
NAMES_SQL: Final = "SELECT city, name, currency FROM city_names WHERE city = ANY($1::text[])"


async def record_names(conn: asyncpg.Connection, entries: Sequence[domain.JournalEntry],
                       batch: Sequence[Delivered]) -> int:
    """Keep the name and currency of every CitySet among the batch's new entries (in the caller's transaction, so a
    name is kept exactly when its entry is journaled); how many cities were named."""
    cities = {d.event.event_id: d.event.data for d in batch if isinstance(d.event, ev.CitySet)}
    latest: dict[str, tuple[str, str, str, int, object]] = {}
    for e in entries:
        if (data := cities.get(e.event_id)) is not None:
            latest[data.city] = (data.city, data.name, data.currency, e.index, e.occurred_at)
    if latest:
        await conn.execute(RECORD_NAMES_SQL, *(list(c) for c in zip(*latest.values())))
    return len(latest)


# --- a city's page ----------------------------------------------------------------------------------------------------

CITY_REPORTS_SQL: Final = """
SELECT city, year, program, budget, issued, redeemed, refunded, revoked, expired, outstanding, carried_in, carried_out
FROM city_reports WHERE city = $1 ORDER BY year, program LIMIT $2"""
# The city's entries among those with index >= $2, oldest first, each with what it adds to the city's chart: issued
# (a mint's debit of the city's budget accounts), redeemed (a redemption's or capture's credit to a provider) and
# available (the net of the city's budget accounts), which are the report's counters and balance entry by entry.
CITY_WINDOW_SQL: Final = """
WITH p AS (
    SELECT p.entry_index, p.account, p.debit, p.credit,
           split_part(p.account, ':', 1) AS kind, split_part(p.account, ':', 2) AS ref
    FROM postings p WHERE p.entry_index >= $2
), c AS (
    SELECT p.*, CASE WHEN p.kind IN ('appropriation', 'budget', 'lapsed') THEN p.ref ELSE a.city END AS city
    FROM p LEFT JOIN accounts a  -- a voucher: or hold: account's row holds its voucher's home (ledger migration 009)
        ON p.kind IN ('voucher', 'hold') AND a.account = p.account
), e AS (
    SELECT c.entry_index,
           coalesce(sum(c.debit) FILTER (WHERE c.kind = 'budget' AND c.city = $1), 0)::bigint AS budget_debits,
           coalesce(sum(c.credit - c.debit) FILTER (WHERE c.kind = 'budget' AND c.city = $1), 0)::bigint
               AS available,
           coalesce(sum(c.credit) FILTER (WHERE c.kind = 'provider'), 0)::bigint AS provider_credits
    FROM c GROUP BY c.entry_index HAVING bool_or(c.city = $1)
)
SELECT j.index, j.type, j.occurred_at, sha256('\\x00'::bytea || j.leaf) AS leaf_hash,
       CASE WHEN j.type IN ('VoucherMinted', 'VouchersMinted') THEN e.budget_debits ELSE 0 END AS issued,
       CASE WHEN j.type IN ('VoucherRedeemed', 'HoldCaptured') THEN e.provider_credits ELSE 0 END AS redeemed,
       e.available
FROM e JOIN journal j ON j.index = e.entry_index ORDER BY j.index"""

# --- the checkpoint history -------------------------------------------------------------------------------------------

RECENT_CHECKPOINTS_SQL: Final = """
SELECT c.seq, c.tree_size, c.root, c.signed_at,
       (SELECT count(*) FROM cosignatures w WHERE w.tree_size = c.tree_size) AS cosignatures
FROM checkpoints c ORDER BY c.seq DESC LIMIT $1"""
