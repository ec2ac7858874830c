"""The journal's Merkle tree (RFC 9162 §2.1, SHA-256), free of I/O: hashes, roots, proofs and their verification.

The tree is never held in memory. Everything here reads *complete subtrees* through a function `get(level, index)`
that returns the hash of the subtree over leaves [index·2^level, (index+1)·2^level) (level 0: leaf hashes). A tree
of any size is the concatenation of O(log n) complete subtrees (one per set bit of its size), so a root, an inclusion
proof or a consistency proof needs O(log n) of them, and appending needs only the complete subtrees of the old tree
(its "frontier", `subtrees(0, size)`). The store keeps every complete subtree; this module says which to read.

Storage is C2SP tlog-tiles (c2sp.org/tlog-tiles), tile height 8: tile (L, N) holds, concatenated, the hashes of the
complete subtrees at tree level 8·L with indexes [256·N, 256·N + width); a full tile has 256 of them, and only the
rightmost tile of a tile level may be partial (width = its tree level's complete subtrees beyond 256·N). A complete
subtree at level 8·L + r (r < 8) is the MTH of 2^r consecutive hashes of one tile (`tile_position`), so a root or a
proof reads O(log n) tiles, and appending reads only the partial tiles of the old tree's right edge (`edge_tiles`)
and writes the tiles it changes (`grow_tiles`): a handful of rows per batch, not about two per entry.

Generation follows the recursive definitions of RFC 9162 §2.1.3.1 (PATH) and §2.1.4.1 (PROOF/SUBPROOF), in loops;
verification follows §2.1.3.2 and §2.1.4.2 step by step, so that any independent implementation agrees.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from schemas.limits import BIGINT_MAX

HASH_SIZE: Final = 32
TILE_HEIGHT: Final = 8                     # c2sp.org/tlog-tiles: a tile spans 8 tree levels ...
TILE_WIDTH: Final = 1 << TILE_HEIGHT       # ... and holds up to 256 hashes of its lowest level
TILE_LEVELS: Final = 8                     # tile levels 0..7 cover tree levels 0..63 (a bigint of leaves)
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()   # MTH({}) = SHA-256() (RFC 9162 §2.1.1)
_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"

SubtreeHash = Callable[[int, int], bytes]   # (level, index) -> hash of that complete subtree


class Subtree(NamedTuple):
    level: int
    index: int

    @property
    def start(self) -> int:
        return self.index << self.level

    @property
    def end(self) -> int:
        return (self.index + 1) << self.level


class Node(NamedTuple):
    level: int
    index: int
    hash: bytes


class ProofError(ValueError):
    """A proof does not verify: the message says which check failed."""


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(_LEAF_PREFIX + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """k, the largest power of two smaller than n (n >= 2), as in RFC 9162 §2.1.1."""
    assert n >= 2, n
    return 1 << ((n - 1).bit_length() - 1)


def subtrees(start: int, end: int) -> list[Subtree]:
    """The complete subtrees, left to right, whose concatenation is leaves [start, end).

    This is how RFC 9162's MTH splits D[start:end] when `start` is a multiple of the largest power of two <= its
    size — true of every range its recursions visit, and of [0, n). The last one is the smallest.
    """
    n = end - start
    assert n >= 1 and start >= 0, (start, end)
    assert start % (1 << (n.bit_length() - 1)) == 0, f"[{start}, {end}) is not aligned as RFC 9162 splits it"
    out = []
    at = start
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            out.append(Subtree(level, at >> level))
            at += 1 << level
    assert at == end
    return out


def range_hash(start: int, end: int, get: SubtreeHash) -> bytes:
    """MTH(D[start:end]) from its complete subtrees: the right edge is folded as RFC 9162 recurses on it."""
    parts = subtrees(start, end)
    h = get(*parts[-1])
    for s in reversed(parts[:-1]):
        h = node_hash(get(*s), h)
    return h


def root(size: int, get: SubtreeHash) -> bytes:
    """MTH of the first `size` leaves."""
    assert 0 <= size <= BIGINT_MAX, size
    return EMPTY_ROOT if size == 0 else range_hash(0, size, get)


def inclusion_proof(index: int, size: int, get: SubtreeHash) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 9162 §2.1.3.1): sibling hashes from the leaf up to the root."""
    assert 0 <= index < size <= BIGINT_MAX, (index, size)
    siblings = []           # collected from the root down, returned leaf first
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:   # PATH(m, D[0:k]) : MTH(D[k:n])
            siblings.append(range_hash(start + k, end, get))
            end = start + k
        else:                   # PATH(m - k, D[k:n]) : MTH(D[0:k])
            siblings.append(range_hash(start, start + k, get))
            start += k
    return siblings[::-1]


def consistency_proof(first: int, second: int, get: SubtreeHash) -> list[bytes]:
    """PROOF(first, D[0:second]) = SUBPROOF(first, D[0:second], true) (RFC 9162 §2.1.4.1); empty when equal."""
    assert 0 < first <= second <= BIGINT_MAX, (first, second)
    parts = []              # collected from the root down, returned deepest first
    start, end, m, whole = 0, second, first, True
    while True:
        n = end - start
        if m == n:
            if not whole:       # SUBPROOF(m, D[m], false) = {MTH(D[m])}
                parts.append(range_hash(start, end, get))
            break
        k = _split(n)
        if m <= k:              # SUBPROOF(m, D[0:k], b) : MTH(D[k:n])
            parts.append(range_hash(start + k, end, get))
            end = start + k
        else:                   # SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k])
            parts.append(range_hash(start, start + k, get))
            start, m, whole = start + k, m - k, False
    return parts[::-1]


def _needed(compute: Callable[[SubtreeHash], object]) -> list[Subtree]:
    """The complete subtrees `compute` reads (which ones never depends on their hashes), in first-read order."""
    seen: dict[Subtree, None] = {}

    def record(level: int, index: int) -> bytes:
        seen[Subtree(level, index)] = None
        return bytes(HASH_SIZE)
    compute(record)
    return list(seen)


def root_subtrees(size: int) -> list[Subtree]:
    return subtrees(0, size) if size else []


def inclusion_subtrees(index: int, size: int) -> list[Subtree]:
    """What `inclusion_proof(index, size)` reads, plus the leaf itself (its hash is served with the proof)."""
    needed = _needed(lambda get: inclusion_proof(index, size, get))
    leaf = Subtree(0, index)
    return needed if leaf in needed else [*needed, leaf]


def consistency_subtrees(first: int, second: int) -> list[Subtree]:
    return _needed(lambda get: consistency_proof(first, second, get))


def grow(size: int, leaf_hashes: Iterable[bytes], get: SubtreeHash) -> list[Node]:
    """The complete subtrees that appending `leaf_hashes` to a tree of `size` leaves creates, level by level.

    Reads only the old tree's frontier (`root_subtrees(size)`) through `get`: O(log n) reads, O(batch) new nodes.
    """
    new: dict[tuple[int, int], bytes] = {}
    out: list[Node] = []
    new_size = size
    for h in leaf_hashes:
        assert len(h) == HASH_SIZE
        new[(0, new_size)] = h
        out.append(Node(0, new_size, h))
        new_size += 1

    def child(level: int, index: int) -> bytes:
        h = new.get((level, index))
        return h if h is not None else get(level, index)

    level = 1
    while new_size >> level > size >> level:     # a level with no new node has none above it either
        for i in range(size >> level, new_size >> level):
            h = node_hash(child(level - 1, 2 * i), child(level - 1, 2 * i + 1))
            new[(level, i)] = h
            out.append(Node(level, i, h))
        level += 1
    return out


# --- verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ---------------------------------------------------------------

def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise ProofError(f"a hash is {len(h) if isinstance(h, bytes) else h!r} bytes long, not {HASH_SIZE}")


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """The root that `path` proves `leaf` (a leaf hash) at `index` into, for a tree of `size` leaves."""
    _check_hashes(leaf, *path)
    if not 0 <= index < size:                       # step 1
        raise ProofError(f"index {index} is not below tree size {size}")
    fn, sn, r = index, size - 1, leaf               # steps 2, 3
    for p in path:                                  # step 4
        if sn == 0:
            raise ProofError("the inclusion path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:                                     # step 5
        raise ProofError("the inclusion path is shorter than the tree is deep")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, path: list[bytes], root_hash: bytes) -> None:
    """Raise ProofError unless `path` proves leaf hash `leaf` is entry `index` of the tree with `root_hash`."""
    _check_hashes(root_hash)
    if root_from_inclusion_proof(index, size, leaf, path) != root_hash:
        raise ProofError(f"the inclusion path of entry {index} does not lead to the root of tree size {size}")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, path: list[bytes]) -> None:
    """Raise ProofError unless `path` proves the tree of `first` leaves is a prefix of the one of `second` leaves."""
    _check_hashes(first_root, second_root, *path)
    if not 0 <= first <= second:
        raise ProofError(f"tree size {first} is not at most {second}")
    if first == second:
        if path:
            raise ProofError("a proof between equal tree sizes must be empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for tree size {first}")
        return
    if first == 0:
        if path:
            raise ProofError("a proof from the empty tree must be empty")
        return                                      # the empty tree is a prefix of every tree
    if not path:                                    # step 1
        raise ProofError("the consistency path is empty")
    if first & (first - 1) == 0:                    # step 2: first is a power of two
        path = [first_root, *path]
    fn, sn = first - 1, second - 1                  # step 3
    while fn & 1:                                   # step 4
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]                               # step 5
    for c in path[1:]:                              # step 6
        if sn == 0:
            raise ProofError("the consistency path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:                                     # step 7
        raise ProofError("the consistency path is shorter than the tree is deep")
    if fr != first_root:
        raise ProofError(f"the consistency path does not lead to the root of tree size {first}")
    if sr != second_root:
        raise ProofError(f"the consistency path does not lead to the root of tree size {second}")


# --- tiles (c2sp.org/tlog-tiles, height 8) ------------------------------------------------------------------------

class Tile(NamedTuple):
    level: int        # tile level L: its hashes are those of tree level 8·L
    index: int        # N: its first hash is the subtree of index 256·N at tree level 8·L
    hashes: bytes     # width × 32 bytes, 1 <= width <= 256


def tile_position(level: int, index: int) -> tuple[int, int, int, int]:
    """Where complete subtree (level, index) lives: (tile level, tile index, first hash in the tile, hash count).

    The subtree is the MTH of `count` = 2^r consecutive hashes of its tile, r = level mod 8 (r = 0: one hash).
    """
    assert 0 <= level < TILE_HEIGHT * TILE_LEVELS and index >= 0, (level, index)
    tile_level, r = divmod(level, TILE_HEIGHT)
    first = index << r
    return tile_level, first >> TILE_HEIGHT, first & (TILE_WIDTH - 1), 1 << r


def tile_width(size: int, tile_level: int, tile_index: int) -> int:
    """How many hashes tile (tile_level, tile_index) holds in the tree of `size` leaves (0: not there yet)."""
    return max(0, min(TILE_WIDTH, (size >> (TILE_HEIGHT * tile_level)) - (tile_index << TILE_HEIGHT)))


def tiles_of(needed: Iterable[Subtree]) -> list[tuple[int, int]]:
    """The tiles that hold the complete subtrees `needed`, each once, in first-needed order."""
    return list(dict.fromkeys(tile_position(*s)[:2] for s in needed))


def edge_tiles(size: int) -> list[tuple[int, int]]:
    """The partial tiles of the tree of `size` leaves (its right edge): what appending to it reads."""
    out = []
    tile_level = 0
    while size >> (TILE_HEIGHT * tile_level):
        count = size >> (TILE_HEIGHT * tile_level)
        if count & (TILE_WIDTH - 1):
            out.append((tile_level, count >> TILE_HEIGHT))
        tile_level += 1
    return out


def _mth_of_hashes(hashes: list[bytes]) -> bytes:
    """MTH over `hashes` taken as the roots of equal complete subtrees (a power of two of them)."""
    while len(hashes) > 1:
        hashes = [node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def _split_hashes(data: bytes) -> list[bytes]:
    return [data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def tile_getter(tiles: dict[tuple[int, int], bytes]) -> SubtreeHash:
    """`get(level, index)` over the tiles read (the caller checked they hold every subtree it will ask for).

    A tile's inner levels are computed once per getter (at most 255 node hashes per tile)."""
    levels: dict[tuple[int, int], list[list[bytes]]] = {}

    def get(level: int, index: int) -> bytes:
        tile_level, tile_index, first, count = tile_position(level, index)
        inner = levels.get((tile_level, tile_index))
        if inner is None:
            inner = levels[(tile_level, tile_index)] = [_split_hashes(tiles[(tile_level, tile_index)])]
        r = count.bit_length() - 1
        while len(inner) <= r:      # the tile's next inner level: only its complete pairs
            below = inner[-1]
            inner.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
        return inner[r][first >> r]
    return get


def grow_tiles(size: int, leaf_hashes: list[bytes], edge: dict[tuple[int, int], bytes]) -> list[Tile]:
    """The tiles that appending `leaf_hashes` to a tree of `size` leaves changes or creates, tile level by level.

    `edge` holds the old tree's partial tiles (`edge_tiles(size)`), read in the appending transaction: each is
    extended, and every tile that becomes full adds its MTH to the tile level above. O(batch) hashes; the rows
    written are the new full tiles and the new right edge.
    """
    out: list[Tile] = []
    count = size                           # complete subtrees at this tile level's tree level, before the batch
    new = list(leaf_hashes)
    for h in new:
        assert len(h) == HASH_SIZE
    tile_level = 0
    while new:
        assert tile_level < TILE_LEVELS, "the tree outgrew 2^64 leaves"
        first_tile, offset = count >> TILE_HEIGHT, count & (TILE_WIDTH - 1)
        old = edge[(tile_level, first_tile)] if offset else b""
        assert len(old) == offset * HASH_SIZE, (tile_level, first_tile, len(old), offset)
        hashes = _split_hashes(old) + new
        parents = []
        for start in range(0, len(hashes), TILE_WIDTH):
            chunk = hashes[start:start + TILE_WIDTH]
            out.append(Tile(tile_level, first_tile + start // TILE_WIDTH, b"".join(chunk)))
            if len(chunk) == TILE_WIDTH:
                parents.append(_mth_of_hashes(chunk))
        new, count, tile_level = parents, count >> TILE_HEIGHT, tile_level + 1
    return out
