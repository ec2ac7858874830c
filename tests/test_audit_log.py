"""The audit log: an RFC 9162 Merkle tree over the journal, signed checkpoints, and proofs any implementation checks.

The Merkle module is checked against published known answers and against a naive reference written here from the
RFC's recursive definitions; the running service's checkpoints are verified with signature code written here too
(not the service's), so that a bug shared by both sides cannot hide.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.ledger import merkle, notes
from tests.harness import ROOT, eventually

# --- a reference implementation, straight from RFC 9162 §2.1 ---------------------------------------------------------

def ref_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def ref_node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def ref_split(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class RefTree:
    """MTH, PATH and PROOF exactly as RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 define them, over leaf hashes."""

    def __init__(self, leaf_hashes: list[bytes]):
        self.leaves = leaf_hashes

    @functools.cache
    def mth(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return self.leaves[start]
        k = ref_split(n)
        return ref_node(self.mth(start, start + k), self.mth(start + k, end))

    def path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = ref_split(n)
        if m < k:
            return self.path(m, start, start + k) + [self.mth(start + k, end)]
        return self.path(m - k, start + k, end) + [self.mth(start, start + k)]

    def subproof(self, m: int, start: int, end: int, b: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if b else [self.mth(start, end)]
        k = ref_split(n)
        if m <= k:
            return self.subproof(m, start, start + k, b) + [self.mth(start + k, end)]
        return self.subproof(m - k, start + k, end, False) + [self.mth(start, start + k)]

    def inclusion(self, index: int, size: int) -> list[bytes]:
        return self.path(index, 0, size)

    def consistency(self, first: int, second: int) -> list[bytes]:
        return self.subproof(first, 0, second, True)


def stored_tree(leaf_hashes: list[bytes], batches: list[int] | None = None) -> dict[tuple[int, int], bytes]:
    """The complete subtrees the service would store, grown batch by batch as store.append grows them."""
    nodes: dict[tuple[int, int], bytes] = {}
    size = 0
    for n in batches or [len(leaf_hashes)]:
        for node in merkle.grow(size, leaf_hashes[size:size + n], lambda lvl, i: nodes[(lvl, i)]):
            nodes[(node.level, node.index)] = node.hash
        size += n
    assert size == len(leaf_hashes)
    return nodes


# --- known answers --------------------------------------------------------------------------------------------------
from tests.ct_vectors import CT_CONSISTENCY, CT_EMPTY_ROOT, CT_INCLUSION, CT_LEAVES, CT_ROOTS  # noqa: E402


def hexes(hashes: list[bytes]) -> list[str]:
    return [h.hex() for h in hashes]


def test_the_ct_reference_tree_has_the_published_roots():
    leaf_hashes = [merkle.leaf_hash(leaf) for leaf in CT_LEAVES]
    assert merkle.EMPTY_ROOT.hex() == CT_EMPTY_ROOT
    for size in range(1, 9):
        nodes = stored_tree(leaf_hashes[:size])
        assert merkle.root(size, lambda lvl, i: nodes[(lvl, i)]).hex() == CT_ROOTS[size - 1], size
        assert RefTree(leaf_hashes).mth(0, size).hex() == CT_ROOTS[size - 1], size


def test_the_ct_reference_proofs_are_generated_and_verified():
    leaf_hashes = [merkle.leaf_hash(leaf) for leaf in CT_LEAVES]
    nodes = stored_tree(leaf_hashes, batches=[3, 1, 4])
    get = lambda lvl, i: nodes[(lvl, i)]  # noqa: E731
    for index, size, path in CT_INCLUSION:
        assert hexes(merkle.inclusion_proof(index, size, get)) == path, (index, size)
        merkle.verify_inclusion(index, size, leaf_hashes[index], [bytes.fromhex(h) for h in path],
                                bytes.fromhex(CT_ROOTS[size - 1]))
    for first, second, path in CT_CONSISTENCY:
        assert hexes(merkle.consistency_proof(first, second, get)) == path, (first, second)
        merkle.verify_consistency(first, second, bytes.fromhex(CT_ROOTS[first - 1]),
                                  bytes.fromhex(CT_ROOTS[second - 1]), [bytes.fromhex(h) for h in path])


def corrupted_inclusion(index: int, size: int, path: list[bytes]):
    """Variations of a good inclusion proof that must all fail (as transparency-dev/merkle's verifier tests)."""
    yield index + 1, size, path
    if index:
        yield index - 1, size, path
    yield index ^ 2, size, path
    yield index, size * 2, path
    if size // 2 > index:
        yield index, size // 2, path
    yield index, size, [*path, path[-1] if path else bytes(32)]
    yield index, size, [bytes(32), *path]
    if path:
        yield index, size, path[:-1]
    for i in range(len(path)):
        yield index, size, [h if j != i else bytes([h[0] ^ 8]) + h[1:] for j, h in enumerate(path)]


def corrupted_consistency(first: int, second: int, path: list[bytes]):
    yield first + 1, second, path
    yield first - 1, second, path
    yield first ^ 2, second, path
    yield first, second * 2, path
    if second // 2 >= first:
        yield first, second // 2, path
    yield first, second, [*path, bytes(32)]
    yield first, second, [path[0], *path]
    yield first, second, path[:-1]
    for i in range(len(path)):
        yield first, second, [h if j != i else bytes([h[0] ^ 16]) + h[1:] for j, h in enumerate(path)]


def test_every_proof_in_every_tree_of_1_to_70_leaves_matches_the_rfc_and_verifies():
    leaf_hashes = [merkle.leaf_hash(i.to_bytes(2, "big") * (i % 5)) for i in range(70)]
    ref = RefTree(leaf_hashes)
    # Grown in uneven batches, as consumer batches grow the service's tree.
    nodes = stored_tree(leaf_hashes, batches=[1, 2, 5, 1, 13, 8, 32, 8])
    get = lambda lvl, i: nodes[(lvl, i)]  # noqa: E731
    rejected = 0
    for size in range(1, 71):
        root = merkle.root(size, get)
        assert root == ref.mth(0, size), size
        for index in range(size):
            path = merkle.inclusion_proof(index, size, get)
            assert path == ref.inclusion(index, size), (index, size)
            assert set(merkle.inclusion_subtrees(index, size)) >= {merkle.Subtree(0, index)}
            merkle.verify_inclusion(index, size, leaf_hashes[index], path, root)
            for bad_index, bad_size, bad_path in corrupted_inclusion(index, size, path):
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(bad_index, bad_size, leaf_hashes[index], bad_path, root)
                rejected += 1
            with pytest.raises(merkle.ProofError):
                merkle.verify_inclusion(index, size, leaf_hashes[(index + 1) % 70], path, root)
        for first in range(1, size + 1):
            path = merkle.consistency_proof(first, size, get)
            assert path == ref.consistency(first, size), (first, size)
            merkle.verify_consistency(first, size, ref.mth(0, first), root, path)
            if first == size:
                continue
            for bad_first, bad_second, bad_path in corrupted_consistency(first, size, path):
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(bad_first, bad_second, ref.mth(0, first), root, bad_path)
                rejected += 1
            with pytest.raises(merkle.ProofError):
                merkle.verify_consistency(first, size, root, ref.mth(0, first), path)  # swapped roots
    assert rejected > 10_000


def test_proofs_read_only_log_n_stored_subtrees():
    for size in (1, 2, 3, 1000, 2**20 + 12345, 10**9 + 7, 2**62 + 3):
        bound = 2 * size.bit_length() + 2
        assert len(merkle.root_subtrees(size)) <= size.bit_length()
        for index in {0, size // 3, size - 1}:
            assert len(merkle.inclusion_subtrees(index, size)) <= bound, (index, size)
        for first in {1, size // 2 or 1, size}:
            assert len(merkle.consistency_subtrees(first, size)) <= bound, (first, size)


# --- the tree as stored: C2SP tlog-tiles (height 8) ------------------------------------------------------------------

def tiled_tree(leaf_hashes: list[bytes], batches: list[int]) -> dict[tuple[int, int], bytes]:
    """The tiles the service would store, grown batch by batch as commands.journal grows them (reading only the
    old tree's right edge)."""
    tiles: dict[tuple[int, int], bytes] = {}
    size = 0
    for n in batches:
        edge = {t: tiles[t] for t in merkle.edge_tiles(size)}
        for tile in merkle.grow_tiles(size, leaf_hashes[size:size + n], edge):
            old = tiles.get((tile.level, tile.index), b"")
            assert tile.hashes.startswith(old) and len(tile.hashes) > len(old), "a tile only ever grows"
            tiles[(tile.level, tile.index)] = tile.hashes
        size += n
    assert size == len(leaf_hashes)
    return tiles


def tile_get(tiles: dict[tuple[int, int], bytes], needed: list[merkle.Subtree]) -> merkle.SubtreeHash:
    """As queries.subtree_getter: only the tiles holding `needed` are given to the getter."""
    return merkle.tile_getter({t: tiles[t] for t in merkle.tiles_of(needed)})


def check_tiles_hold_the_tree(tiles: dict[tuple[int, int], bytes], size: int) -> None:
    for (level, index), hashes in tiles.items():
        assert len(hashes) == merkle.tile_width(size, level, index) * merkle.HASH_SIZE, (level, index)
    assert {t for t in tiles if len(tiles[t]) < merkle.TILE_WIDTH * merkle.HASH_SIZE} == set(merkle.edge_tiles(size))


def test_tiles_grown_in_uneven_batches_give_every_root_and_proof_of_the_rfc():
    leaf_hashes = [merkle.leaf_hash(i.to_bytes(3, "big")) for i in range(1100)]
    ref = RefTree(leaf_hashes)
    nodes = stored_tree(leaf_hashes)
    tiles = tiled_tree(leaf_hashes, [1, 2, 5, 1, 13, 8, 32, 8, 186, 255, 1, 256, 300, 32])
    check_tiles_hold_the_tree(tiles, 1100)
    assert {level for level, _ in tiles} == {0, 1} and len(tiles) == 5 + 1
    for size in range(1, 1101):
        assert merkle.root(size, tile_get(tiles, merkle.root_subtrees(size))) == ref.mth(0, size), size
        for s in merkle.root_subtrees(size):
            assert tile_get(tiles, [s])(*s) == nodes[s], (size, s)
    rng = random.Random(5)
    for size in [*range(250, 270), 511, 512, 513, 767, 768, 1024, 1025, 1100, *rng.sample(range(1, 1101), 40)]:
        for index in {0, size - 1, *rng.sample(range(size), min(size, 8))}:
            needed = merkle.inclusion_subtrees(index, size)
            get = tile_get(tiles, needed)
            assert merkle.inclusion_proof(index, size, get) == ref.inclusion(index, size), (index, size)
            assert get(0, index) == leaf_hashes[index]
        for first in {1, size, *rng.sample(range(1, size + 1), min(size, 8))}:
            get = tile_get(tiles, merkle.consistency_subtrees(first, size))
            assert merkle.consistency_proof(first, size, get) == ref.consistency(first, size), (first, size)


def test_tiles_reach_the_third_tile_level_and_proofs_read_log_n_tiles():
    n = 256 * 256 + 300
    leaf_hashes = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]
    ref = RefTree(leaf_hashes)
    batches = [2000] * (n // 2000) + [n % 2000]
    tiles = tiled_tree(leaf_hashes, batches)
    check_tiles_hold_the_tree(tiles, n)
    assert (2, 0) in tiles and len(tiles[(2, 0)]) == merkle.HASH_SIZE
    for size in (65535, 65536, 65537, 65536 + 256, n - 1, n):
        assert merkle.root(size, tile_get(tiles, merkle.root_subtrees(size))) == ref.mth(0, size), size
        for index in (0, 255, 256, 65535, size - 1):
            if index < size:
                get = tile_get(tiles, merkle.inclusion_subtrees(index, size))
                assert merkle.inclusion_proof(index, size, get) == ref.inclusion(index, size), (index, size)
        for first in (1, 256, 300, 65535, 65536, size):
            if first <= size:
                get = tile_get(tiles, merkle.consistency_subtrees(first, size))
                assert merkle.consistency_proof(first, size, get) == ref.consistency(first, size), (first, size)
    for size in (1, 1000, 2**20 + 12345, 10**9 + 7, 2**62 + 3):
        bound = 2 * (size.bit_length() // merkle.TILE_HEIGHT + 1)
        for index in {0, size // 3, size - 1}:
            assert len(merkle.tiles_of(merkle.inclusion_subtrees(index, size))) <= bound, (index, size)
        assert len(merkle.edge_tiles(size)) <= size.bit_length() // merkle.TILE_HEIGHT + 1


async def test_a_ledger_with_entries_moves_its_tree_into_tiles_and_keeps_growing_it():
    """Migration 004 on a ledger journaled before it (its tree as one row per complete subtree, built by 002), then
    appends through commands.journal, small batches (one statement) and big ones (COPY): every root and sampled
    proof is the RFC's over the journal's leaves, and a tile that disagrees with the journal's size fails a batch."""
    import datetime as dt
    import uuid

    from schemas import events as ev
    from services.common import db
    from services.common.consumer import Delivered
    from services.ledger import app as ledger_app, commands, queries
    from services.stack import create_database, drop_database

    dsn = await create_database("cvl_tiles")
    conn = await asyncpg.connect(dsn, server_settings={"search_path": "ledger"})
    try:
        await conn.execute("CREATE SCHEMA ledger")
        for path in sorted(db.COMMON_MIGRATIONS.glob("*.sql")):
            await conn.execute(path.read_text())
        ledger_migrations = sorted(ledger_app.MIGRATIONS.glob("*.sql"))
        assert [p.name for p in ledger_migrations][:4] == ["001_init.sql", "002_merkle_log.sql", "003_programs.sql",
                                                            "004_merkle_tiles.sql"]
        await conn.execute(ledger_migrations[0].read_text())
        before = 256 * 3 + 77        # journaled before the tree existed; 002 builds it, 004 moves it into tiles
        await conn.execute("""
            INSERT INTO journal (index, event_id, type, occurred_at, leaf)
            SELECT i, gen_random_uuid(), 'CitySet', now(), convert_to('leaf ' || i, 'UTF8')
            FROM generate_series(0, $1 - 1) AS i""", before)
        await conn.execute("UPDATE log_head SET size = $1", before)
        for path in ledger_migrations[1:]:
            await conn.execute(path.read_text())
        assert await conn.fetchval("SELECT to_regclass('merkle_nodes')") is None

        now = dt.datetime.now(dt.timezone.utc)

        def minted() -> Delivered:
            event = ev.VoucherMinted(
                event_id=str(uuid.uuid4()), occurred_at=now, producer="issuing", actor="test",
                data=ev.VoucherMintedData(voucher_id=str(uuid.uuid4()), city="wuxi", year=2026, beneficiary="acme",
                                          kind="compute", amount=7, subsidy_ratio_bp=10000, providers=None,
                                          expires_at=now + dt.timedelta(days=30), created_at=now))
            return Delivered("t", 0, 0, event)
        for n in (1, 7, 180, 64, 63, 500, 2):    # below and above LEDGER_COPY_ENTRIES_MIN
            async with conn.transaction():
                journaled = await commands.journal(conn, [minted() for _ in range(n)])
                assert len(journaled.entries) == n
        size = before + 817
        assert journaled.size == size
        leaves = [bytes(r["leaf"]) for r in await conn.fetch("SELECT leaf FROM journal ORDER BY index")]
        assert len(leaves) == size
        ref = RefTree([ref_leaf(leaf) for leaf in leaves])
        rng = random.Random(9)
        for m in sorted({1, 255, 256, 257, before - 1, before, before + 1, size, *rng.sample(range(1, size), 30)}):
            get = await queries.subtree_getter(conn, merkle.root_subtrees(m))
            assert merkle.root(m, get) == ref.mth(0, m), m
            index = rng.randrange(m)
            get = await queries.subtree_getter(conn, merkle.inclusion_subtrees(index, m))
            assert merkle.inclusion_proof(index, m, get) == ref.inclusion(index, m), (index, m)
            get = await queries.subtree_getter(conn, merkle.consistency_subtrees(m, size))
            assert merkle.consistency_proof(m, size, get) == ref.consistency(m, size), m
        tiles = {(r["level"], r["index"]): bytes(r["hashes"]) for r in await conn.fetch("SELECT * FROM merkle_tiles")}
        check_tiles_hold_the_tree(tiles, size)
        assert await conn.fetchval("SELECT sum(debits) = sum(credits) FROM accounts")
        # A tile that does not hold what the journal's size says fails the next batch rather than fork the tree.
        await conn.execute("UPDATE merkle_tiles SET hashes = substring(hashes FROM 1 FOR length(hashes) - 32) "
                           "WHERE level = 0 AND index = $1", size // 256)
        with pytest.raises(queries.MissingSubtree):
            async with conn.transaction():
                await commands.journal(conn, [minted()])
        assert await conn.fetchval("SELECT size FROM log_head") == size
    finally:
        await conn.close()
        await drop_database(dsn)


# --- signed notes, checked with code of this test's own --------------------------------------------------------------

def parse_verifier_key(text: str) -> tuple[str, bytes, Ed25519PublicKey]:
    name, key_id_hex, encoded = text.strip().split("+", 2)
    raw = base64.b64decode(encoded, validate=True)
    assert len(raw) == 33 and raw[0] == 0x01, "an Ed25519 verifier key is 0x01 followed by 32 bytes"
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert key_id.hex() == key_id_hex, "the key id is SHA-256(name ‖ 0x0A ‖ 0x01 ‖ key)[:4]"
    return name, key_id, Ed25519PublicKey.from_public_bytes(raw[1:])


def open_checkpoint(note: str, key_text: str) -> tuple[str, int, bytes]:
    """(origin, size, root) of a C2SP checkpoint note signed by the verifier key `key_text`; AssertionError if not."""
    name, key_id, public = parse_verifier_key(key_text)
    body, sep, signatures = note.rpartition("\n\n")
    assert sep, "a signed note has a blank line before its signatures"
    body += "\n"
    verified = False
    for line in signatures.removesuffix("\n").split("\n"):
        m = re.fullmatch(r"\u2014 (\S+) ([A-Za-z0-9+/=]+)", line)
        assert m, f"not a signature line: {line!r}"
        raw = base64.b64decode(m[2], validate=True)
        if m[1] == name and raw[:4] == key_id:
            try:
                public.verify(raw[4:], body.encode())
            except InvalidSignature:
                raise AssertionError("the checkpoint's signature does not verify") from None
            verified = True
    assert verified, "no signature by the log's key"
    origin, size, root, *extensions = body.split("\n")
    assert extensions == [""], "no extension lines expected"
    assert origin == name, "the key name is the origin"
    return origin, int(size), base64.b64decode(root, validate=True)


# The example key and note of the Go reference implementation of signed notes (golang.org/x/mod/sumdb/note, the
# package documentation's "Example"). Ed25519 is deterministic: signing the text again gives these exact bytes.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann "
           "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")


def test_the_log_signs_notes_exactly_as_the_go_reference_does():
    key = notes.parse_private_key(GO_SKEY)
    assert key.verifier() == GO_VKEY
    assert key.sign(GO_TEXT) == GO_NOTE
    assert notes.format_private_key("PeterNeumann", notes.parse_private_key(GO_SKEY).private.private_bytes_raw()) \
        == GO_SKEY
    # And a checkpoint signed by a fresh key opens with this test's own verifier.
    fresh = notes.LogKey.from_seed("cvl.example/ledger", bytes(range(32)))
    root = hashlib.sha256(b"root").digest()
    note = fresh.sign(notes.checkpoint_body(fresh.name, 42, root))
    assert open_checkpoint(note, fresh.verifier()) == ("cvl.example/ledger", 42, root)
    assert notes.open_note(note, fresh) == (fresh.name, 42, root)
    for bad in (note.replace("42", "43"), note.replace("\u2014", "-"), note[:-10] + "AAAAAAAAA\n"):
        with pytest.raises(notes.NoteError):
            notes.open_note(bad, fresh)


def test_the_log_key_is_made_once_or_taken_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(notes.KEY_ENV, raising=False)
    made = notes.load_log_key(tmp_path, "cvl.example/ledger")
    assert (tmp_path / "log.key").stat().st_mode & 0o777 == 0o600
    assert notes.load_log_key(tmp_path, "cvl.example/ledger").public == made.public, "kept, not made again"
    with pytest.raises(notes.NoteError, match="origin"):
        notes.load_log_key(tmp_path, "another.example/log")
    monkeypatch.setenv(notes.KEY_ENV, GO_SKEY)
    assert notes.load_log_key(tmp_path, "PeterNeumann").verifier() == GO_VKEY
    monkeypatch.setenv(notes.KEY_ENV, GO_SKEY.replace("c74f20a3", "c74f20a4"))
    with pytest.raises(notes.NoteError, match="does not match"):
        notes.load_log_key(tmp_path, "PeterNeumann")


# --- against the running service ------------------------------------------------------------------------------------

async def get_text(api, url: str, token: str | None = None) -> str:
    r = await api.call("GET", url, token=token)
    assert r.status == 200, (url, r.status, r.body)
    assert r.headers["Content-Type"].startswith("text/plain"), r.headers["Content-Type"]
    return r.body


async def all_entries(api, ledger: str, token: str, upto: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < upto:
        r = await api.call("GET", f"{ledger}/v1/entries?start={len(out)}&limit=1000", token=token)
        assert r.status == 200, r.body
        assert r.body["entries"], f"the journal has fewer than {upto} entries"
        out.extend(r.body["entries"])
    assert [e["index"] for e in out] == list(range(len(out)))
    return out[:upto]


async def all_checkpoints(api, ledger: str, token: str) -> list[dict]:
    out: list[dict] = []
    while True:
        r = await api.call("GET", f"{ledger}/v1/checkpoints?start={len(out)}&limit=1000", token=token)
        assert r.status == 200, r.body
        out.extend(r.body["checkpoints"])
        if len(r.body["checkpoints"]) < 1000:
            return out


async def signed_at_least(api, w, size: int, timeout_s: float = 10.0) -> tuple[str, int, bytes, str]:
    """Wait for a checkpoint of at least `size` entries; (note, size, root, verifier key)."""
    key = await get_text(api, f"{w.ledger}/v1/log/key")

    async def check():
        r = await api.call("GET", f"{w.ledger}/v1/checkpoint")
        if r.status != 200:
            return None
        _, signed, root = open_checkpoint(r.body, key)
        return (r.body, signed, root, key) if signed >= size else None
    return await eventually(check, timeout_s=timeout_s, interval_s=0.1)


async def journal_size(api, w) -> int:
    r = await api.call("GET", f"{w.ledger}/v1/trial-balance", token=w.auditor)
    return r.body["entries"]


async def mint_many(api, w, count: int, amount: int = 1) -> list[str]:
    """`count` single mints (so `count` journal entries: a batch request's vouchers share VouchersMinted entries)."""
    async def one() -> str:
        r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(amount))
        assert r.status == 201, r.body
        return r.body["voucher_id"]
    return list(await asyncio.gather(*(one() for _ in range(count))))


async def journaled(api, w, count: int) -> int:
    """Wait until the ledger has journaled this world's `count` mints; the journal's size then."""
    async def check():
        r = await api.call("GET", f"{w.ledger}/v1/reports/cities/{w.city}/{w.year}", token=w.auditor)
        return r.status == 200 and r.body["issued"] >= count
    await eventually(check)
    return await journal_size(api, w)


def b64s(hashes: list[str]) -> list[bytes]:
    return [base64.b64decode(h, validate=True) for h in hashes]


async def test_a_checkpoint_is_signed_within_a_second_and_proves_every_entry(world_factory, api):
    w = await world_factory(10**9)
    await mint_many(api, w, 40)
    size = await journaled(api, w, 40)
    started = time.monotonic()
    note, signed, root, key = await signed_at_least(api, w, size)
    assert time.monotonic() - started < 2.5, "a checkpoint within about a second of growth"

    # The signed root is the root of the served leaves, recomputed here.
    entries = await all_entries(api, w.ledger, w.auditor, signed)
    leaf_hashes = [ref_leaf(base64.b64decode(e["leaf"])) for e in entries]
    ref = RefTree(leaf_hashes)
    assert ref.mth(0, signed) == root

    # Inclusion proofs for every entry of several tree sizes, against the reference and the RFC's verifier.
    sizes = sorted({1, 2, 3, 5, 8, 13, signed // 2, signed - 1, signed} - {0})
    for tree_size in sizes:
        tree_root = ref.mth(0, tree_size)
        proofs = await asyncio.gather(*(
            api.call("GET", f"{w.ledger}/v1/proofs/inclusion?index={i}&tree_size={tree_size}", token=w.auditor)
            for i in range(tree_size)))
        for index, r in enumerate(proofs):
            assert r.status == 200, r.body
            assert (r.body["index"], r.body["tree_size"]) == (index, tree_size)
            assert base64.b64decode(r.body["leaf_hash"]) == leaf_hashes[index]
            path = b64s(r.body["path"])
            assert path == ref.inclusion(index, tree_size), (index, tree_size)
            merkle.verify_inclusion(index, tree_size, leaf_hashes[index], path, tree_root)
        for first in range(1, tree_size + 1):
            r = await api.call("GET", f"{w.ledger}/v1/proofs/consistency?first={first}&second={tree_size}",
                               token=w.auditor)
            assert r.status == 200, r.body
            assert (r.body["first"], r.body["second"]) == (first, tree_size)
            path = b64s(r.body["path"])
            assert path == ref.consistency(first, tree_size), (first, tree_size)
            merkle.verify_consistency(first, tree_size, ref.mth(0, first), tree_root, path)


async def test_every_checkpoint_is_kept_signed_and_consistent_with_the_one_before(world_factory, api):
    w = await world_factory(10**9)
    for step in range(1, 4):  # growth in steps, so that there are several checkpoints
        await mint_many(api, w, 5)
        await signed_at_least(api, w, await journaled(api, w, 5 * step))
    key = await get_text(api, f"{w.ledger}/v1/log/key")
    checkpoints = await all_checkpoints(api, w.ledger, w.auditor)
    assert len(checkpoints) >= 3
    opened = [open_checkpoint(c["note"], key) for c in checkpoints]
    assert [size for _, size, _ in opened] == [c["tree_size"] for c in checkpoints]
    assert all(a[1] < b[1] for a, b in zip(opened, opened[1:])), "tree sizes strictly increase"
    assert all(c["signed_at"] for c in checkpoints)
    latest = await get_text(api, f"{w.ledger}/v1/checkpoint")
    assert open_checkpoint(latest, key)[1] >= opened[-1][1]
    for (_, m, root_m), (_, n, root_n) in zip(opened, opened[1:]):
        r = await api.call("GET", f"{w.ledger}/v1/proofs/consistency?first={m}&second={n}", token=w.auditor)
        assert r.status == 200, r.body
        merkle.verify_consistency(m, n, root_m, root_n, b64s(r.body["path"]))
    # Paging: a window of the list is the same slice of it.
    r = await api.call("GET", f"{w.ledger}/v1/checkpoints?start=1&limit=2", token=w.auditor)
    assert r.body["checkpoints"] == checkpoints[1:3]


async def test_bad_proof_requests_are_problems_naming_the_parameter(world_factory, api, stack):
    w = await world_factory(10**9)
    await mint_many(api, w, 3)
    _, signed, _, _ = await signed_at_least(api, w, await journaled(api, w, 3))
    cases = [
        ("inclusion?tree_size=1", 422, "index"),
        ("inclusion?index=0", 422, "tree_size"),
        ("inclusion?index=x&tree_size=1", 422, "index"),
        ("inclusion?index=-1&tree_size=1", 422, "index"),
        ("inclusion?index=0&tree_size=0", 422, "tree_size"),
        ("inclusion?index=1.5&tree_size=3", 422, "index"),
        ("inclusion?index=3&tree_size=3", 422, "index"),
        ("inclusion?index=0&tree_size=99999999999999999999", 422, "tree_size"),
        (f"inclusion?index=0&tree_size={signed + 10**6}", 404, "tree_size"),
        ("consistency?first=1", 422, "second"),
        ("consistency?second=1", 422, "first"),
        ("consistency?first=0&second=1", 422, "first"),
        ("consistency?first=2&second=1", 422, "first"),
        ("consistency?first=1&second=two", 422, "second"),
        (f"consistency?first=1&second={signed + 10**6}", 404, "second"),
    ]
    for query, status, param in cases:
        r = await api.call("GET", f"{w.ledger}/v1/proofs/{query}", token=w.auditor)
        assert r.status == status, (query, r.status, r.body)
        assert r.headers["Content-Type"].startswith("application/problem+json"), query
        assert r.body["code"] == {422: "validation_error", 404: "not_found"}[status], (query, r.body)
        if status == 422:
            assert r.body["field"] == param, (query, r.body)
        assert param in r.body["detail"], (query, r.body)
    for bad in ("start=-1", "limit=0", "limit=1001", "start=z"):
        r = await api.call("GET", f"{w.ledger}/v1/checkpoints?{bad}", token=w.auditor)
        assert (r.status, r.body["code"]) == (422, "validation_error"), (bad, r.body)


async def test_proofs_and_checkpoints_are_global_for_any_auditor_and_closed_to_others(world_factory, api, stack):
    w = await world_factory(10**9)
    await mint_many(api, w, 2)
    await signed_at_least(api, w, await journaled(api, w, 2))
    scoped = stack.token("auditor", city="some-other-city")
    urls = ["/v1/proofs/inclusion?index=0&tree_size=1", "/v1/proofs/consistency?first=1&second=2",
            "/v1/checkpoints"]
    for url in urls:
        for token in (w.auditor, scoped, w.admin):
            r = await api.call("GET", f"{w.ledger}{url}", token=token)
            assert r.status == 200, (url, r.body)
        r = await api.call("GET", f"{w.ledger}{url}")
        assert (r.status, r.body["code"]) == (401, "unauthorized"), url
        r = await api.call("GET", f"{w.ledger}{url}", token=w.issuer)
        assert (r.status, r.body["code"]) == (403, "forbidden"), url
    # Signed public material: no token needed.
    key = await get_text(api, f"{w.ledger}/v1/log/key")
    open_checkpoint(await get_text(api, f"{w.ledger}/v1/checkpoint"), key)


async def metric(api, url: str, name: str) -> float:
    r = await api.call("GET", f"{url}/metrics")
    for line in r.body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_the_log_metrics_follow_the_tree_and_its_checkpoints(world_factory, api):
    w = await world_factory(10**9)
    await mint_many(api, w, 3)
    _, signed, _, _ = await signed_at_least(api, w, await journaled(api, w, 3))

    async def caught_up():
        size = await metric(api, w.ledger, "cvl_ledger_journal_size_entries")
        return size >= signed and await metric(api, w.ledger, "cvl_ledger_checkpoint_tree_size") >= signed
    await eventually(caught_up, timeout_s=10)
    assert 0 <= await metric(api, w.ledger, "cvl_ledger_checkpoint_age_seconds") < 10
    assert await metric(api, w.ledger, "cvl_ledger_checkpoints_signed_total") >= 1
    assert await metric(api, w.ledger, 'cvl_ledger_checkpoint_failures_total{reason="inconsistent"}') == 0


async def test_the_signer_refuses_a_tree_that_does_not_extend_the_last_checkpoint(world_factory, api, stack):
    """A stored subtree changed behind the ledger's back: no checkpoint is signed, and the refusal is counted."""
    from services.ledger import store
    w = await world_factory(10**9)
    await mint_many(api, w, 3)
    await signed_at_least(api, w, await journaled(api, w, 3))
    failures_metric = 'cvl_ledger_checkpoint_failures_total{reason="inconsistent"}'
    failures = await metric(api, w.ledger, failures_metric)
    locker = await asyncpg.connect(stack.dsn)
    tamper = await asyncpg.connect(stack.dsn)
    try:
        # Hold the signer's lock while the log grows and a stored subtree of the signed tree is changed.
        hold = locker.transaction()
        await hold.start()
        assert await locker.fetchval(store.TRY_LOCK_SIGNER_SQL, store.SIGNER_LOCK_KEY)
        signed = await locker.fetchval("SELECT max(tree_size) FROM ledger.checkpoints")
        await mint_many(api, w, 2)
        size = await journaled(api, w, 5)
        assert size > signed
        # The largest subtree of the signed tree: the new root or the consistency proof reads it. It is stored in
        # a tile (C2SP tlog-tiles): its first hash there is changed.
        victim = merkle.root_subtrees(signed)[0]
        tile_level, tile_index, first, _ = merkle.tile_position(victim.level, victim.index)
        at = first * merkle.HASH_SIZE + 1
        original = await tamper.fetchval(
            "SELECT substring(hashes FROM $3 FOR 32) FROM ledger.merkle_tiles WHERE level = $1 AND index = $2",
            tile_level, tile_index, at)
        await tamper.execute(
            "UPDATE ledger.merkle_tiles SET hashes = overlay(hashes PLACING sha256($4::bytea) FROM $3 FOR 32) "
            "WHERE level = $1 AND index = $2", tile_level, tile_index, at, original)
        await hold.rollback()

        async def refused():
            return await metric(api, w.ledger, failures_metric) > failures
        await eventually(refused, timeout_s=10)
        assert await tamper.fetchval("SELECT max(tree_size) FROM ledger.checkpoints") == signed, "nothing signed"
        # Repaired, signing resumes, and the next checkpoint is consistent with the last.
        await tamper.execute(
            "UPDATE ledger.merkle_tiles SET hashes = overlay(hashes PLACING $4::bytea FROM $3 FOR 32) "
            "WHERE level = $1 AND index = $2", tile_level, tile_index, at, original)
    finally:
        await tamper.close()
        await locker.close()
    _, after, after_root, key = await signed_at_least(api, w, size)
    last_before = next(c for c in await all_checkpoints(api, w.ledger, w.auditor) if c["tree_size"] == signed)
    r = await api.call("GET", f"{w.ledger}/v1/proofs/consistency?first={signed}&second={after}", token=w.auditor)
    merkle.verify_consistency(signed, after, open_checkpoint(last_before["note"], key)[2], after_root,
                              b64s(r.body["path"]))


async def test_a_restarted_ledger_keeps_the_tree_and_its_next_checkpoint_is_consistent(world_factory, api, stack):
    w = await world_factory(10**9)
    await mint_many(api, w, 10)
    before_note, before, before_root, key = await signed_at_least(api, w, await journaled(api, w, 10))
    victim = stack.procs["ledger"][0]
    stack.kill(victim, signal.SIGKILL)
    restarted = stack.start("ledger", port=victim.port)
    await stack.wait_ready(restarted)
    assert await get_text(api, f"{w.ledger}/v1/log/key") == key, "the same key after a restart"
    await mint_many(api, w, 10)
    size = await journaled(api, w, 20)
    _, after, after_root, _ = await signed_at_least(api, w, size)
    assert after > before
    r = await api.call("GET", f"{w.ledger}/v1/proofs/consistency?first={before}&second={after}", token=w.auditor)
    assert r.status == 200, r.body
    merkle.verify_consistency(before, after, before_root, after_root, b64s(r.body["path"]))
    checkpoints = await all_checkpoints(api, w.ledger, w.auditor)
    sizes = [c["tree_size"] for c in checkpoints]
    assert sizes == sorted(set(sizes)) and before_note in [c["note"] for c in checkpoints]
    # And the whole tree is still the tree of the journal.
    entries = await all_entries(api, w.ledger, w.auditor, after)
    assert RefTree([ref_leaf(base64.b64decode(e["leaf"])) for e in entries]).mth(0, after) == after_root


async def test_two_ledger_replicas_grow_one_tree_and_take_turns_signing(world_factory, api, stack):
    """Both replicas append (the consumer group splits the partitions) and both try to sign every round."""
    w = await world_factory(10**9)
    second = stack.start("ledger")
    await stack.wait_ready(second)
    try:
        before = len(await all_checkpoints(api, w.ledger, w.auditor))
        for step in range(1, 6):
            await mint_many(api, w, 20)
            await signed_at_least(api, w, await journaled(api, w, 20 * step))
        key = await get_text(api, f"{second.url}/v1/log/key")
        assert key == await get_text(api, f"{w.ledger}/v1/log/key"), "one log, one key"
        checkpoints = await all_checkpoints(api, second.url, w.auditor)
        assert len(checkpoints) >= before + 3
        opened = [open_checkpoint(c["note"], key) for c in checkpoints]
        assert all(a[1] < b[1] for a, b in zip(opened, opened[1:])), "tree sizes strictly increase"
        for (_, m, root_m), (_, n, root_n) in zip(opened[before:], opened[before + 1:]):
            r = await api.call("GET", f"{second.url}/v1/proofs/consistency?first={m}&second={n}", token=w.auditor)
            merkle.verify_consistency(m, n, root_m, root_n, b64s(r.body["path"]))
        _, size, root = opened[-1]
        entries = await all_entries(api, second.url, w.auditor, size)
        assert RefTree([ref_leaf(base64.b64decode(e["leaf"])) for e in entries]).mth(0, size) == root
    finally:
        stack.kill(second, signal.SIGTERM)


# --- alerts ---------------------------------------------------------------------------------------------------------

def promtool() -> str:
    out = subprocess.run(["bash", str(ROOT / "deploy" / "promtool.sh"), "ensure"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_alert_rules_are_valid_and_fire_on_a_stale_checkpoint():
    tool = promtool()
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    check = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool, "test", "rules", str(ROOT / "deploy" / "prometheus" / "alerts_test.yml")],
                          capture_output=True, text=True, timeout=120)
    assert unit.returncode == 0, unit.stdout + unit.stderr


# --- inclusion proof latency on a large tree (opt in: CVL_PROOF_BENCH_ENTRIES=100000) --------------------------------

BENCH_ENTRIES = int(os.environ.get("CVL_PROOF_BENCH_ENTRIES", "0"))
BENCH_REQUESTS = 1000


@pytest.mark.skipif(BENCH_ENTRIES <= 0, reason="set CVL_PROOF_BENCH_ENTRIES (e.g. 100000) to measure")
@pytest.mark.timeout(1800)
async def test_inclusion_proof_latency_on_a_large_tree(world_factory, api):
    w = await world_factory(10**12)
    started = time.monotonic()
    ids = await mint_many(api, w, BENCH_ENTRIES)
    size = await journaled(api, w, BENCH_ENTRIES)
    _, signed, root, _ = await signed_at_least(api, w, size, timeout_s=30)
    built_s = time.monotonic() - started
    await w.redeemable(ids[-1])   # measured once the redemption service has consumed the mints too (a quiet machine)
    rng = random.Random(7)
    latencies = []
    for _ in range(BENCH_REQUESTS):
        index = rng.randrange(signed)
        t = time.perf_counter()
        r = await api.call("GET", f"{w.ledger}/v1/proofs/inclusion?index={index}&tree_size={signed}",
                           token=w.auditor)
        latencies.append(time.perf_counter() - t)
        assert r.status == 200, r.body
        merkle.verify_inclusion(index, signed, base64.b64decode(r.body["leaf_hash"]), b64s(r.body["path"]), root)
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99) - 1] * 1000
    report = (f"inclusion proofs: tree of {signed} entries (built in {built_s:.0f} s), {BENCH_REQUESTS} sequential "
              f"requests: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1] * 1000:.2f} ms")
    print(report)
    Path(ROOT / ".run" / "proof-latency.txt").write_text(report + "\n")
    assert p99 <= 10.0, report
