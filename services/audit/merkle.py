"""RFC 9162 §2.1 Merkle tree hashing and proof verification, written for the auditor's tool alone.

An auditor's verifier must not share code with the server it checks: a bug shared by both would hide itself. So
this module is an independent implementation, from the RFC text, of what services/ledger computes; it imports
nothing from services/ledger, and its tests check it against the published RFC 6962 (Certificate Transparency)
known-answer vectors and against a naive recursive MTH.

    leaf hash  = SHA-256(0x00 ‖ leaf)                 (RFC 9162 §2.1.1)
    node hash  = SHA-256(0x01 ‖ left ‖ right)
    MTH({})    = SHA-256("")
    MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two < n

`Frontier` keeps the O(log n) stack of complete subtrees of a tree being streamed, so the root at any size can be
computed as the leaves go by without keeping them.
"""
from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Final

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
PROOF_LENGTH_MAX: Final = 128  # a path is at most ~2·log2(size) hashes; sizes are < 2**63

_sha256: Final = hashlib.sha256


def leaf_hash(leaf: bytes) -> bytes:
    return _sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the given leaf hashes, by the RFC's recursive definition (reference; O(n) memory)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)  # the largest power of two < n
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


class Frontier:
    """The roots of the complete subtrees of the leaves appended so far, largest (leftmost) first.

    After n leaves there is one subtree per set bit of n; appending merges equal-sized subtrees like a binary
    counter, so each append costs one leaf hash plus, amortised, one node hash.
    """

    __slots__ = ("size", "stack")

    def __init__(self) -> None:
        self.size = 0
        self.stack: list[bytes] = []

    def append(self, hashed_leaf: bytes) -> None:
        stack = self.stack
        stack.append(hashed_leaf)
        self.size = n = self.size + 1
        while not n & 1:
            right = stack.pop()
            stack[-1] = _sha256(b"\x01" + stack[-1] + right).digest()
            n >>= 1

    def root(self) -> bytes:
        return fold(self.stack)


def fold(stack: Sequence[bytes]) -> bytes:
    """MTH of a tree from its complete subtrees (largest first), folded from the right: RFC 9162's split at the
    largest power of two below n is exactly the boundary between the first subtree and the rest."""
    if not stack:
        return EMPTY_ROOT
    it = reversed(stack)
    root = next(it)
    for left in it:
        root = _sha256(b"\x01" + left + root).digest()
    return root


class ProofError(ValueError):
    """A proof that does not verify, with why."""


def verify_inclusion(index: int, tree_size: int, hashed_leaf: bytes, path: Sequence[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2; raises ProofError unless `path` proves leaf `index` is in the tree of `root`."""
    if not 0 <= index < tree_size:
        raise ProofError(f"index {index} is not below tree size {tree_size}")
    if len(path) > PROOF_LENGTH_MAX or any(len(p) != HASH_SIZE for p in path):
        raise ProofError("the inclusion path is malformed")
    fn, sn, r = index, tree_size - 1, hashed_leaf
    for p in path:
        if sn == 0:
            raise ProofError("the inclusion path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the inclusion path is shorter than the tree is deep")
    if r != root:
        raise ProofError("the inclusion path does not lead to the root")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 §2.1.4.2; raises ProofError unless `path` proves the tree of `first_root` (size `first`) is a prefix
    of the tree of `second_root` (size `second`)."""
    if not 0 <= first <= second:
        raise ProofError(f"first size {first} is not between 0 and second size {second}")
    if len(path) > PROOF_LENGTH_MAX or any(len(p) != HASH_SIZE for p in path):
        raise ProofError("the consistency path is malformed")
    if first == second:
        if path:
            raise ProofError("a proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError(f"two different roots for the same size {first}")
        return
    if first == 0:
        if path:
            raise ProofError("a proof from the empty tree must be empty")
        return  # every tree extends the empty one
    if not path:
        raise ProofError("the consistency path is empty")
    nodes = list(path)
    if first & (first - 1) == 0:  # an exact power of two: the first tree is itself a subtree of the second
        nodes.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = nodes[0]
    for c in nodes[1:]:
        if sn == 0:
            raise ProofError("the consistency path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("the consistency path is shorter than the tree is deep")
    if fr != first_root:
        raise ProofError(f"the consistency path does not lead to the root of size {first}")
    if sr != second_root:
        raise ProofError(f"the consistency path does not lead to the root of size {second}")


# --- proofs, for tests and for sampling: computed from all leaf hashes (O(n)) -----------------------------------------

def inclusion_path(leaf_hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1 (reference implementation, used to test the verifier)."""
    n = len(leaf_hashes)
    if n <= 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if index < k:
        return inclusion_path(leaf_hashes[:k], index) + [root_of(leaf_hashes[k:])]
    return inclusion_path(leaf_hashes[k:], index - k) + [root_of(leaf_hashes[:k])]


def consistency_path(leaf_hashes: Sequence[bytes], first: int) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1 (reference implementation, used to test the verifier)."""
    def subproof(m: int, d: Sequence[bytes], complete: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if complete else [root_of(d)]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return subproof(m, d[:k], complete) + [root_of(d[k:])]
        return subproof(m - k, d[k:], False) + [root_of(d[:k])]
    if not 0 < first < len(leaf_hashes):
        return []
    return subproof(first, leaf_hashes, True)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
