"""RFC 9162 §2.1 Merkle tree proofs, written from the RFC (SHA-256; leaf hash SHA-256(0x00 ‖ leaf), node hash
SHA-256(0x01 ‖ left ‖ right)): §2.1.3.2 verifies an inclusion proof, §2.1.4.2 a consistency proof. No I/O."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

from .errors import NotConsistent, ProofError


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion(index: int, tree_size: int, hashed_leaf: bytes, path: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2: the root that `path` leads to from leaf `index` of a tree of `tree_size` leaves."""
    if not 0 <= index < tree_size:
        raise ProofError(f"leaf index {index} is not below tree size {tree_size}")
    fn, sn, r = index, tree_size - 1, hashed_leaf
    for p in path:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is high")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is high")
    return r


def verify_inclusion(index: int, tree_size: int, hashed_leaf: bytes, path: Sequence[bytes], root: bytes) -> None:
    if root_from_inclusion(index, tree_size, hashed_leaf, path) != root:
        raise ProofError(f"entry {index} is not in the tree of size {tree_size} with that root")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2: the tree of `second` leaves (root `second_root`) extends the tree of `first` leaves."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    if first == second:
        if path:
            raise ProofError("a consistency proof between equal sizes is empty")
        if first_root != second_root:
            raise NotConsistent(f"two different roots for tree size {first}")
        return
    if not path:
        raise ProofError("the consistency proof is empty")
    nodes = list(path)
    if first & (first - 1) == 0:  # first is an exact power of 2: its root is the proof's implicit first node
        nodes.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the trees are high")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the trees are high")
    if fr != first_root or sr != second_root:
        raise NotConsistent(f"the tree of size {second} does not extend the tree of size {first}")
