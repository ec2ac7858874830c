"""Witnessed checkpoints (CONTRACT.md "Witnessed checkpoints"): the ledger submits each new checkpoint to the
witnesses it is configured with and keeps their cosignatures, so that an auditor who requires a quorum of them knows
the operator showed every witness, and so every auditor, the same log.

Protocol, as C2SP tlog-witness specifies it (C2SP/C2SP tlog-witness.md, "add-checkpoint"):

    POST <url>/add-checkpoint
        old <size the witness last cosigned, 0 at first>\\n
        <base64 hash>\\n ...               RFC 6962 consistency proof from the old size (none when it is 0; <= 63)
        \\n
        <the signed checkpoint note>
    200  one or more signature lines: our cosignature is the one of the witness's key (tlog-cosignature v1)
    409  text/x.tlog.size: the size the witness last cosigned, when `old` was not it; we retry once with that size
    403  none of the note's signatures verifies under a key the witness trusts for our origin
    404  the witness does not know our origin (litewitness answers 403 for that too)
    400  a malformed request, or old > size;  422  the consistency proof does not verify

`CVL_WITNESSES` lists them as comma-separated `VERIFIER_KEY=URL` (the witness's C2SP verifier key, type 0x04, and
its submission prefix). Each witness has a submitter task of its own in every ledger replica: a witness that is
slow, wrong or down delays nothing but its own cosignatures (journal appends and signing never wait for it). A round
submits the latest checkpoint when the witness has not cosigned it: under a backlog the intermediate checkpoints
are skipped, as tlog-witness only keeps the latest. Bounds: WITNESS_TIMEOUT_S per request, WITNESS_ATTEMPTS_MAX
requests per round, WITNESS_BACKOFF_MIN_S..WITNESS_BACKOFF_MAX_S between failed rounds, WITNESS_RESPONSE_BYTES_MAX
read. Replicas may submit the same checkpoint twice; the witness cosigns it again (same size, same root) and the
first row stored wins.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Final, NamedTuple

import aiohttp
import asyncpg
import msgspec

from schemas.limits import (
    LOG_STATUS_REFRESH_S, WITNESS_ATTEMPTS_MAX, WITNESS_BACKOFF_MAX_S, WITNESS_BACKOFF_MIN_S, WITNESS_POLL_S,
    WITNESS_PROOF_LINES_MAX, WITNESS_RESPONSE_BYTES_MAX, WITNESS_TIMEOUT_S, WITNESSES_MAX,
)

from services.common import metrics

from . import merkle, notes, queries, store

log = logging.getLogger("cvl.ledger.witnesses")

WITNESSES_ENV: Final = "CVL_WITNESSES"
SIZE_CONTENT_TYPE: Final = "text/x.tlog.size"
OUTCOMES: Final = ("cosigned", "conflict", "refused", "rejected", "invalid", "unavailable")


class Witness(NamedTuple):
    key: notes.WitnessKey
    verifier: str               # its verifier key, as configured (the `witness` column of cosignatures)
    url: str                    # its submission prefix, without a trailing slash


class WitnessView(msgspec.Struct, kw_only=True):
    name: str
    key: str                    # the C2SP verifier key (type 0x04: cosignature/v1, Ed25519)
    url: str


class WitnessList(msgspec.Struct, kw_only=True):
    witnesses: list[WitnessView]


def parse_witnesses(text: str) -> list[Witness]:
    """`VERIFIER_KEY=URL[,VERIFIER_KEY=URL...]`. A key's base64 (33 bytes) has no padding, so the first '=' ends it."""
    found: list[Witness] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        key_text, sep, url = item.partition("=")
        if not sep:
            raise ValueError(f"{WITNESSES_ENV}: {item[:80]!r} is not VERIFIER_KEY=URL")
        try:
            key = notes.parse_witness_key(key_text)
        except notes.NoteError as exc:
            raise ValueError(f"{WITNESSES_ENV}: {exc}") from None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{WITNESSES_ENV}: the URL of witness {key.name} is not http(s)://: {url[:80]!r}")
        if any(w.key.name == key.name for w in found):
            raise ValueError(f"{WITNESSES_ENV}: witness {key.name} is listed twice")
        found.append(Witness(key, key.verifier(), url.rstrip("/")))
    if len(found) > WITNESSES_MAX:
        raise ValueError(f"{WITNESSES_ENV}: {len(found)} witnesses, more than WITNESSES_MAX ({WITNESSES_MAX})")
    return found


def witnesses_from_env() -> list[Witness]:
    return parse_witnesses(os.environ.get(WITNESSES_ENV, ""))


def listing(witnesses: list[Witness]) -> WitnessList:
    return WitnessList(witnesses=[WitnessView(name=w.key.name, key=w.verifier, url=w.url) for w in witnesses])


def request_body(old_size: int, proof: list[bytes], note: str) -> bytes:
    assert len(proof) <= WITNESS_PROOF_LINES_MAX and (old_size > 0 or not proof)
    lines = [f"old {old_size}\n"] + [base64.b64encode(h).decode() + "\n" for h in proof] + ["\n", note]
    return "".join(lines).encode()


class WitnessError(Exception):
    """A round that got no cosignature; `outcome` is the metric's label."""

    def __init__(self, outcome: str, message: str):
        assert outcome in OUTCOMES
        super().__init__(message)
        self.outcome = outcome


async def _consistency_proof(pool: asyncpg.Pool, old_size: int, size: int) -> list[bytes]:
    if old_size == 0 or old_size == size:
        return []
    async with pool.acquire() as conn:
        get = await queries.subtree_getter(conn, merkle.consistency_subtrees(old_size, size))
    return merkle.consistency_proof(old_size, size, get)


async def _read_bounded(response: aiohttp.ClientResponse) -> str:
    body = bytearray()
    async for chunk in response.content.iter_chunked(8192):
        body += chunk
        if len(body) > WITNESS_RESPONSE_BYTES_MAX:
            raise WitnessError("invalid", f"the answer is longer than {WITNESS_RESPONSE_BYTES_MAX} bytes")
    try:
        return body.decode()
    except UnicodeDecodeError:
        raise WitnessError("invalid", "the answer is not UTF-8") from None


class Submitter:
    """One witness's submissions from this replica: a task that wakes when this replica signed a checkpoint (or every
    WITNESS_POLL_S, for checkpoints other replicas signed), and backs off after failed rounds."""

    def __init__(self, pool: asyncpg.Pool, session: aiohttp.ClientSession, witness: Witness):
        self.pool, self.session, self.witness = pool, session, witness
        self.wake = asyncio.Event()
        # The size the witness told us it holds (409), which may differ from the largest it cosigned for us (e.g.
        # a witness whose state was reset, or one that another log shares a name with); None until it tells us.
        self.witness_size: int | None = None

    @property
    def name(self) -> str:
        return self.witness.key.name

    async def run(self) -> None:
        backoff = WITNESS_BACKOFF_MIN_S
        while True:
            self.wake.clear()
            try:
                await self.round()
            except WitnessError as exc:
                metrics.witness_submissions.labels(self.name, exc.outcome).inc()
                level = logging.WARNING if exc.outcome in ("unavailable", "conflict") else logging.ERROR
                log.log(level, "witness %s gave no cosignature: %s", self.name, exc,
                        extra={"witness": self.name, "outcome": exc.outcome, "retry_in_s": backoff})
            except Exception:
                log.exception("submitting a checkpoint to witness %s failed", self.name,
                              extra={"witness": self.name, "retry_in_s": backoff})
            else:
                backoff = WITNESS_BACKOFF_MIN_S
                try:
                    await asyncio.wait_for(self.wake.wait(), WITNESS_POLL_S)
                except TimeoutError:
                    pass
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, WITNESS_BACKOFF_MAX_S)

    async def round(self) -> None:
        """Submit the latest checkpoint if this witness has not cosigned it; store its cosignature."""
        row = await self.pool.fetchrow(store.WITNESS_ROUND_SQL, self.witness.verifier)
        if row is None or row["cosigned"]:
            return
        size, note = row["tree_size"], row["note"]
        old = self.witness_size if self.witness_size is not None else row["witness_size"]
        if old > size:  # the witness holds a newer checkpoint (another replica's): take the latest next round
            old = row["witness_size"]
        for attempt in range(WITNESS_ATTEMPTS_MAX):
            status, content_type, body = await self._post(old, size, note)
            if status == 200:
                await self._keep(size, note, body)
                return
            if status == 409 and content_type == SIZE_CONTENT_TYPE:
                known = _parse_size(body)
                self.witness_size = known
                metrics.witness_submissions.labels(self.name, "conflict").inc()
                if known > size:
                    raise WitnessError("conflict", f"it holds tree size {known}, beyond our latest checkpoint "
                                                   f"{size} (another replica's newer one, or not our log)")
                if known == old:
                    # tlog-witness: the same size with another root. The witness saw a different tree of this size:
                    # a split view or a forked log. Never resolved by retrying.
                    raise WitnessError("rejected", f"it holds another root at tree size {size}: a fork")
                old = known
                continue
            reason = body.strip()[:200]
            if status in (403, 404):
                raise WitnessError("refused", f"{status} (is it configured with our origin {note.split(chr(10))[0]} "
                                              f"and our verifier key?): {reason}")
            if status in (400, 422):
                raise WitnessError("rejected", f"{status} for old size {old} and size {size}: {reason}")
            raise WitnessError("unavailable", f"{status}: {reason}")
        raise WitnessError("conflict", f"still 409 after {WITNESS_ATTEMPTS_MAX} attempts")

    async def _post(self, old: int, size: int, note: str) -> tuple[int, str, str]:
        body = request_body(old, await _consistency_proof(self.pool, old, size), note)
        try:
            async with self.session.post(f"{self.witness.url}/add-checkpoint", data=body,
                                         headers={"Content-Type": "text/plain; charset=utf-8"},
                                         timeout=aiohttp.ClientTimeout(total=WITNESS_TIMEOUT_S),
                                         allow_redirects=False) as response:
                return response.status, response.content_type, await _read_bounded(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WitnessError("unavailable", f"{type(exc).__name__}: {exc}") from None

    async def _keep(self, size: int, note: str, answer: str) -> None:
        try:
            cosignature = notes.find_cosignature(answer, notes.note_body(note), self.witness.key)
        except notes.NoteError as exc:
            raise WitnessError("invalid", str(exc)) from None
        if cosignature is None:
            raise WitnessError("invalid", f"its answer carries no cosignature by {self.witness.verifier}")
        await self.pool.execute(store.INSERT_COSIGNATURE_SQL, size, self.witness.verifier, cosignature.line,
                                cosignature.timestamp)
        self.witness_size = size
        metrics.witness_submissions.labels(self.name, "cosigned").inc()
        log.debug("checkpoint cosigned", extra={"witness": self.name, "tree_size": size})


def _parse_size(body: str) -> int:
    text = body.strip()
    if not text.isdigit() or len(text) > 19:
        raise WitnessError("invalid", f"a 409 whose body is not a tree size: {text[:40]!r}")
    return int(text)


async def refresh_status(pool: asyncpg.Pool, witnesses: list[Witness]) -> None:
    """Background task: the witness gauges follow the database (cosignatures stored by any replica)."""
    names = {w.verifier: w.key.name for w in witnesses}
    for w in witnesses:
        for outcome in OUTCOMES:
            metrics.witness_submissions.labels(w.key.name, outcome)
    while True:
        try:
            for r in await pool.fetch(store.WITNESS_STATUS_SQL, list(names)):
                metrics.witness_cosigned_size.labels(names[r["witness"]]).set(r["cosigned_size"])
                metrics.witness_missing.labels(names[r["witness"]]).set(float(r["waiting_s"] or 0.0))
        except Exception:
            log.exception("reading the witnesses' status failed")
        await asyncio.sleep(LOG_STATUS_REFRESH_S)
