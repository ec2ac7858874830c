"""Ledger SQL and row mapping: named, parameterised statements (the journal's append, the Merkle tree, checkpoints,
the reads), and the response Structs made from their rows, each checked where it is read back. No I/O here: the
commands (commands.py) and the reads (queries.py) run these statements.
"""
from __future__ import annotations

import base64
from collections import defaultdict
from typing import Final

import asyncpg

from schemas.ledger import Account, CheckpointView, CityReport, Entry, EntryBudget, Posting, TrialBalance

from . import domain

# --- the journal (commands.journal), in the order it runs -------------------------------------------------------------

LOCK_HEAD_SQL: Final = "SELECT size FROM log_head FOR UPDATE"
# After the lock (a fresh snapshot), in one round trip: which of the batch's events the journal already has, and
# the stored tiles of the tree's right edge (merkle.edge_tiles), in the order asked (NULL for a missing one).
JOURNALED_AND_EDGE_SQL: Final = """
SELECT ARRAY(SELECT event_id::text FROM journal WHERE event_id = ANY($1::uuid[])) AS journaled,
       ARRAY(SELECT m.hashes FROM unnest($2::smallint[], $3::bigint[]) WITH ORDINALITY AS w(level, index, n)
             LEFT JOIN merkle_tiles m USING (level, index) ORDER BY w.n) AS edge"""
# A big batch copies its entries and postings (binary COPY: one encode per row, no unnest); a small one writes them
# in the statement that writes everything else (WRITE_WITH_ENTRIES_SQL), saving the COPYs' round trips.
JOURNAL_TABLE: Final = "journal"
JOURNAL_COLUMNS: Final = ("index", "event_id", "type", "occurred_at", "leaf")
POSTINGS_TABLE: Final = "postings"
POSTINGS_COLUMNS: Final = ("entry_index", "seq", "account", "debit", "credit")
# One statement, one round trip, for what a batch adds: account totals summed per batch (one row per account,
# upserted in account order, so that two writers could never wait on each other's rows in a cycle; the log_head
# lock already serialises appends), with the home (city, year, program) of a voucher: or hold: account, kept on
# its row from the first event that moved it (no row of its own per voucher); city reports (columns in the order of
# domain.CityYear, then domain.ReportDelta), the Merkle tiles the batch changed, and the log head. A tile only ever grows:
# an existing one is replaced only by a longer one that starts with it, so a full tile never changes; `tiles`
# counts the tiles written, and fewer than given means a stored tile disagreed (the caller fails the batch).
_WRITE_SQL: Final = """
WITH {entries}
a AS (INSERT INTO accounts AS a (account, debits, credits, city, year, program)
      SELECT u.account, u.debits, u.credits, u.city, u.year, u.program
      FROM unnest($3::text[], $4::bigint[], $5::bigint[], $18::text[], $19::int[], $20::text[])
          AS u(account, debits, credits, city, year, program)
      ORDER BY u.account
      ON CONFLICT (account) DO UPDATE
          SET debits = a.debits + EXCLUDED.debits, credits = a.credits + EXCLUDED.credits, updated_at = now(),
              city = coalesce(a.city, EXCLUDED.city), year = coalesce(a.year, EXCLUDED.year),
              program = coalesce(a.program, EXCLUDED.program)),
r AS (INSERT INTO city_reports AS r (city, year, program, budget, issued, redeemed, refunded, revoked, expired,
                                     outstanding, carried_in, carried_out)
      SELECT u.* FROM unnest($6::text[], $7::int[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[],
                             $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[], $16::bigint[],
                             $17::bigint[])
          AS u(city, year, program, budget, issued, redeemed, refunded, revoked, expired, outstanding, carried_in,
               carried_out)
      ORDER BY u.city, u.year, u.program
      ON CONFLICT (city, year, program) DO UPDATE SET
          budget = r.budget + EXCLUDED.budget, issued = r.issued + EXCLUDED.issued,
          redeemed = r.redeemed + EXCLUDED.redeemed, refunded = r.refunded + EXCLUDED.refunded,
          revoked = r.revoked + EXCLUDED.revoked, expired = r.expired + EXCLUDED.expired,
          outstanding = r.outstanding + EXCLUDED.outstanding, carried_in = r.carried_in + EXCLUDED.carried_in,
          carried_out = r.carried_out + EXCLUDED.carried_out),
t AS (INSERT INTO merkle_tiles AS m (level, index, hashes)
      SELECT * FROM unnest($21::smallint[], $22::bigint[], $23::bytea[])
      ON CONFLICT (level, index) DO UPDATE SET hashes = EXCLUDED.hashes
          WHERE length(EXCLUDED.hashes) > length(m.hashes)
            AND substring(EXCLUDED.hashes FROM 1 FOR length(m.hashes)) = m.hashes
      RETURNING 1),
h AS (UPDATE log_head SET size = $2 WHERE size = $1 RETURNING size)
SELECT (SELECT size FROM h) AS size, (SELECT count(*) FROM t) AS tiles"""
WRITE_SQL: Final = _WRITE_SQL.format(entries="")
WRITE_WITH_ENTRIES_SQL: Final = _WRITE_SQL.format(entries="""
j AS (INSERT INTO journal (index, event_id, type, occurred_at, leaf)
      SELECT * FROM unnest($24::bigint[], $25::uuid[], $26::text[], $27::timestamptz[], $28::bytea[])),
p AS (INSERT INTO postings (entry_index, seq, account, debit, credit)
      SELECT * FROM unnest($29::bigint[], $30::int[], $31::text[], $32::bigint[], $33::bigint[])),""")

# --- the Merkle tree and its checkpoints (commands.sign_checkpoint, queries) ------------------------------------------

TILES_SQL: Final = """
SELECT m.level, m.index, m.hashes
FROM unnest($1::smallint[], $2::bigint[]) AS w(level, index) JOIN merkle_tiles m USING (level, index)"""
SIGNER_LOCK_KEY: Final = 0x63766C_636B70  # "cvlckp": one checkpoint signer at a time across replicas
TRY_LOCK_SIGNER_SQL: Final = "SELECT pg_try_advisory_xact_lock($1)"
LATEST_CHECKPOINT_SQL: Final = """
SELECT seq, tree_size, root, note, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1"""
INSERT_CHECKPOINT_SQL: Final = """
INSERT INTO checkpoints (seq, tree_size, root, note) VALUES ($1, $2, $3, $4) RETURNING signed_at"""
SIGNED_SIZE_SQL: Final = "SELECT coalesce(max(tree_size), 0) FROM checkpoints"
# A checkpoint as served: its note followed by the cosignature lines collected for it (witnesses' lines in their
# keys' order; a signed note's verifier ignores lines of keys it does not know: C2SP signed-note).
LIST_CHECKPOINTS_SQL: Final = """
SELECT c.tree_size, c.note || coalesce((SELECT string_agg(w.line || E'\\n', '' ORDER BY w.witness)
                                        FROM cosignatures w WHERE w.tree_size = c.tree_size), '') AS note,
       c.signed_at
FROM checkpoints c WHERE c.seq >= $1 ORDER BY c.seq LIMIT $2"""
LATEST_NOTE_SQL: Final = """
SELECT c.note || coalesce((SELECT string_agg(w.line || E'\\n', '' ORDER BY w.witness)
                           FROM cosignatures w WHERE w.tree_size = c.tree_size), '') AS note
FROM checkpoints c ORDER BY c.seq DESC LIMIT 1"""
# What the metrics follow, in one snapshot: the journal's size, the latest checkpoint, and how long ago it was signed
# (or, before the first, how long ago the first entry arrived) by the database's clock.
LOG_STATUS_SQL: Final = """
SELECT h.size, c.tree_size AS signed_size,
       extract(epoch FROM now() - coalesce(c.signed_at, (SELECT appended_at FROM journal WHERE index = 0)))
           AS checkpoint_age_s
FROM log_head h LEFT JOIN LATERAL (
    SELECT tree_size, signed_at FROM checkpoints ORDER BY seq DESC LIMIT 1) c ON true"""

# --- witnesses (witnesses.py) -----------------------------------------------------------------------------------------
# One submitter's round, in one snapshot: the latest checkpoint, whether this witness (its verifier key, $1) cosigned
# it, and the largest size it cosigned (its `old` size, when it has not told us another with a 409).
WITNESS_ROUND_SQL: Final = """
SELECT c.tree_size, c.note,
       EXISTS (SELECT 1 FROM cosignatures w WHERE w.witness = $1 AND w.tree_size = c.tree_size) AS cosigned,
       (SELECT coalesce(max(w.tree_size), 0) FROM cosignatures w WHERE w.witness = $1) AS witness_size
FROM checkpoints c ORDER BY c.seq DESC LIMIT 1"""
INSERT_COSIGNATURE_SQL: Final = """
INSERT INTO cosignatures (tree_size, witness, line, cosigned_at) VALUES ($1, $2, $3, to_timestamp($4))
ON CONFLICT (tree_size, witness) DO NOTHING"""
# What the witness gauges follow, per configured witness ($1, verifier keys): the largest size it cosigned, and how
# long the oldest checkpoint after that one has waited (NULL when it cosigned the latest), by the database's clock.
WITNESS_STATUS_SQL: Final = """
SELECT k.witness, coalesce(s.size, 0) AS cosigned_size,
       extract(epoch FROM now() - (SELECT c.signed_at FROM checkpoints c WHERE c.tree_size > coalesce(s.size, 0)
                                   ORDER BY c.tree_size LIMIT 1)) AS waiting_s
FROM unnest($1::text[]) AS k(witness)
LEFT JOIN LATERAL (SELECT max(w.tree_size) AS size FROM cosignatures w WHERE w.witness = k.witness) s ON true"""

# --- reads ------------------------------------------------------------------------------------------------------------

HEAD_SQL: Final = "SELECT size FROM log_head"
GET_ACCOUNT_SQL: Final = "SELECT account, debits, credits FROM accounts WHERE account = $1"
# The home of a voucher: or hold: account ($1: its name), kept on its row.
VOUCHER_HOME_SQL: Final = "SELECT city, year FROM accounts WHERE account = $1"
# One statement, so the counters and the three account balances come from one snapshot.
GET_REPORT_SQL: Final = """
SELECT r.city, r.year, r.program, r.budget, r.issued, r.redeemed, r.refunded, r.revoked, r.expired, r.outstanding,
       r.carried_in, r.carried_out,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $4) AS appropriation_balance,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $5) AS budget_balance,
       (SELECT a.credits - a.debits FROM accounts a WHERE a.account = $6) AS lapsed_balance
FROM city_reports r WHERE r.city = $1 AND r.year = $2 AND r.program = $3"""
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
SELECT city, year, program, budget, issued, redeemed, refunded, revoked, expired, outstanding, carried_in, carried_out
FROM city_reports ORDER BY city, year, program LIMIT $1"""
BALANCES_SQL: Final = "SELECT account, credits - debits AS balance FROM accounts WHERE account = ANY($1::text[])"
RECENT_ENTRIES_SQL: Final = """
SELECT j.index, j.type, j.occurred_at, sha256('\\x00'::bytea || j.leaf) AS leaf_hash
FROM journal j ORDER BY j.index DESC LIMIT $1"""


# --- queries with cursors (queries.account_entries, queries.account_at) -------------------------------------------
# Entries touching an account after a position, oldest first, through postings (account, entry_index): the scan reads
# at most $3 of the account's entries (one per entry, though it may post to the account more than once), then keeps
# those whose occurred_at is in [$4, $5) (NULL: unbounded), at most $6. `scanned` and `last_scanned` say whether the
# scan stopped at its bound (then the next page goes on from last_scanned) or at the account's end.
ACCOUNT_ENTRIES_SQL: Final = """
WITH scanned AS MATERIALIZED (
    SELECT DISTINCT p.entry_index FROM postings p
    WHERE p.account = $1 AND p.entry_index > $2
    ORDER BY p.entry_index LIMIT $3),
hits AS (
    SELECT j.index FROM scanned s JOIN journal j ON j.index = s.entry_index
    WHERE ($4::timestamptz IS NULL OR j.occurred_at >= $4) AND ($5::timestamptz IS NULL OR j.occurred_at < $5)
    ORDER BY j.index LIMIT $6)
SELECT ARRAY(SELECT index FROM hits ORDER BY index) AS hits, (SELECT count(*) FROM scanned) AS scanned,
       (SELECT max(entry_index) FROM scanned) AS last_scanned"""
JOURNAL_AT_SQL: Final = """
SELECT index, event_id::text, type, occurred_at, leaf FROM journal WHERE index = ANY($1::bigint[]) ORDER BY index"""
POSTINGS_AT_SQL: Final = """
SELECT entry_index, account, debit, credit FROM postings WHERE entry_index = ANY($1::bigint[])
ORDER BY entry_index, seq"""
ACCOUNT_MOVED_SQL: Final = "SELECT EXISTS (SELECT 1 FROM accounts WHERE account = $1)"
# An account's totals over entries 0 .. $2-1. Committed postings never change, so the sum over the first $2 entries
# (PREFIX) is the same whenever it is read; when $2 is near the head, the running totals less the postings from $2 on
# (SUFFIX, in one statement: one snapshot) read fewer rows. Both read the index (account, entry_index) INCLUDE
# (debit, credit) only.
ACCOUNT_PREFIX_SQL: Final = """
SELECT coalesce(sum(p.debit), 0) AS debits, coalesce(sum(p.credit), 0) AS credits
FROM postings p WHERE p.account = $1 AND p.entry_index < $2"""
ACCOUNT_SUFFIX_SQL: Final = """
SELECT a.debits - coalesce(s.debits, 0) AS debits, a.credits - coalesce(s.credits, 0) AS credits
FROM accounts a, LATERAL (SELECT sum(p.debit) AS debits, sum(p.credit) AS credits FROM postings p
                          WHERE p.account = $1 AND p.entry_index >= $2) s
WHERE a.account = $1"""


# --- views ------------------------------------------------------------------------------------------------------------

def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def account_view(row: asyncpg.Record) -> Account:
    return Account(account=row["account"], debits=row["debits"], credits=row["credits"],
                   balance=row["credits"] - row["debits"])


def report_view(row: asyncpg.Record | dict) -> CityReport:
    """The report of one (city, year, program), checked against the three accounts it summarises (all read in one
    snapshot).

    - outstanding, summed from voucher:/hold: postings, equals issued − redeemed + refunded − revoked − expired;
    - the appropriation's balance is minus the budget set, which is the budget less what was carried in (carried
      value comes from the previous year's vouchers, not from the appropriation);
    - available (the budget account) + lapsed + carried_out = budget − issued + revoked + expired: the budget
      account receives budget (set and carried in) and revoked, and gives issued; what expired went either to
      lapsed of this year or, carried out, to the next year's budget (not this year's account).
    """
    appropriation = row["appropriation_balance"] or 0
    available = row["budget_balance"] or 0
    lapsed = row["lapsed_balance"] or 0
    report = CityReport(city=row["city"], year=row["year"], program=row["program"], budget=row["budget"],
                        issued=row["issued"], redeemed=row["redeemed"], refunded=row["refunded"],
                        revoked=row["revoked"], expired=row["expired"], outstanding=row["outstanding"],
                        available=available, carried_in=row["carried_in"], carried_out=row["carried_out"])
    assert report.outstanding == (report.issued - report.redeemed + report.refunded - report.revoked
                                  - report.expired), report
    assert appropriation == -(report.budget - report.carried_in), (appropriation, report)
    assert available + lapsed + report.carried_out == (report.budget - report.issued + report.revoked
                                                       + report.expired), (lapsed, report)
    return report


def trial_balance_view(row: asyncpg.Record) -> TrialBalance:
    balance = TrialBalance(debits=int(row["debits"]), credits=int(row["credits"]), entries=row["entries"])
    assert balance.debits == balance.credits, balance
    return balance


def entries_view(journal: list[asyncpg.Record], postings: list[asyncpg.Record]) -> list[Entry]:
    """Entries as stored: the leaf is served as written, so an auditor's verifier, not this server, judges it. An
    entry that is a step of a budget (leaf v2) also shows the step, read from its leaf (`budget_view`)."""
    by_entry: dict[int, list[Posting]] = defaultdict(list)
    for p in postings:
        by_entry[p["entry_index"]].append(Posting(account=p["account"], debit=p["debit"], credit=p["credit"]))
    return [Entry(index=j["index"], event_id=j["event_id"], type=j["type"], occurred_at=j["occurred_at"],
                  postings=by_entry.get(j["index"], []), leaf=b64(j["leaf"]), budget=budget_view(j["leaf"]))
            for j in journal]


def budget_view(leaf: bytes) -> EntryBudget | None:
    step = domain.leaf_budget(bytes(leaf))
    if step is None:
        return None
    return EntryBudget(city=step.city, program=step.program, year=step.year, seq=step.seq, amount=step.amount,
                       committed=step.committed, carried=step.carried, returned=step.returned,
                       voucher=step.voucher)


def checkpoint_view(row: asyncpg.Record) -> CheckpointView:
    return CheckpointView(tree_size=row["tree_size"], note=row["note"], signed_at=row["signed_at"])
