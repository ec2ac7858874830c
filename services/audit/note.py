"""C2SP signed notes and tlog checkpoints, verified with an Ed25519 verifier key (the auditor's own code).

Like merkle.py this is written from the specifications (https://c2sp.org/signed-note, https://c2sp.org/tlog-checkpoint)
and shares nothing with the ledger service that signs:

    verifier key   <name>+<8 hex digits key id>+<base64(0x01 ‖ 32-byte Ed25519 public key)>
    key id         the first 4 bytes of SHA-256(<name> ‖ 0x0A ‖ 0x01 ‖ public key)
    signed note    <body, ending in a newline>
                   <blank line>
                   — <name> <base64(4-byte key id ‖ 64-byte signature over the body's bytes)>   (one line per signer)
    checkpoint     the body is <origin>\\n<tree size, decimal>\\n<base64 root hash>\\n[extension lines]

A note may carry signatures of other keys (witnesses, for instance); they are ignored. It verifies when one
signature line names our key (name and key id) and its Ed25519 signature over the body is valid.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from pathlib import Path
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALG_ED25519: Final = 0x01
NOTE_LENGTH_MAX: Final = 1_000_000          # a checkpoint is a few hundred bytes; refuse anything huge
SIGNATURES_PER_NOTE_MAX: Final = 100
SIGNATURE_PREFIX: Final = "\u2014 "          # an em dash and a space
TREE_SIZE_MAX: Final = 2**63 - 1
_NAME_RE: Final = re.compile(r"^[^\s+]+$")   # no whitespace, no plus sign
_SIZE_RE: Final = re.compile(r"^(0|[1-9][0-9]{0,18})$")  # decimal, no leading zero


class NoteError(ValueError):
    """A key, note or checkpoint that is malformed or does not verify, with why."""


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise NoteError(f"{what} is not valid base64") from exc


class VerifierKey(NamedTuple):
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey
    text: str


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:4]


def parse_verifier_key(text: str) -> VerifierKey:
    """`name+hexkeyid+base64(0x01‖pub)`; the key id must be the one the name and key imply."""
    text = text.strip()
    parts = text.split("+", 2)  # the base64 key may itself hold '+'
    if len(parts) != 3:
        raise NoteError("a verifier key is <name>+<key id>+<key>")
    name, hex_id, b64_key = parts
    if not _NAME_RE.match(name):
        raise NoteError(f"the key name {name!r} is empty or has whitespace or '+'")
    if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
        raise NoteError(f"the key id {hex_id!r} is not 8 lowercase hex digits")
    raw = _b64decode(b64_key, "the verifier key")
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise NoteError("the verifier key is not an Ed25519 key (0x01 followed by 32 bytes)")
    if key_id(name, raw[1:]) != bytes.fromhex(hex_id):
        raise NoteError(f"the key id {hex_id} does not match the key name and public key")
    return VerifierKey(name, bytes.fromhex(hex_id), Ed25519PublicKey.from_public_bytes(raw[1:]), text)


def load_verifier_key(arg: str) -> VerifierKey:
    """`arg` is the key itself or a file holding it."""
    if Path(arg).is_file():
        return parse_verifier_key(Path(arg).read_text())
    return parse_verifier_key(arg)


def verify_note(note: str, key: VerifierKey) -> str:
    """The body of `note` when it carries a valid signature by `key`; NoteError otherwise."""
    if len(note) > NOTE_LENGTH_MAX:
        raise NoteError("the note is too long")
    if not note.endswith("\n"):
        raise NoteError("the note does not end with a newline")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("the note has no blank line between body and signatures")
    body, signatures = note[:split + 1], note[split + 2:]
    lines = signatures[:-1].split("\n")
    if not lines or len(lines) > SIGNATURES_PER_NOTE_MAX:
        raise NoteError("the note has no signature lines, or too many")
    ours = 0
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"signature line {line[:80]!r} does not start with an em dash")
        fields = line[len(SIGNATURE_PREFIX):].split(" ")
        if len(fields) != 2:
            raise NoteError(f"signature line {line[:80]!r} is not '— <name> <signature>'")
        name, b64_sig = fields
        raw = _b64decode(b64_sig, f"the signature of {name}")
        if len(raw) < 5:
            raise NoteError(f"the signature of {name} is too short")
        if name != key.name or raw[:4] != key.key_id:
            continue  # someone else's signature (a witness, say): not ours to judge
        ours += 1
        try:
            key.public_key.verify(raw[4:], body.encode())
        except InvalidSignature:
            raise NoteError(f"the signature by {name} ({key.key_id.hex()}) is not valid for this note") from None
    if not ours:
        raise NoteError(f"the note carries no signature by {key.name} ({key.key_id.hex()})")
    return body


class Checkpoint(NamedTuple):
    origin: str
    tree_size: int
    root: bytes
    extensions: tuple[str, ...]


def parse_checkpoint(body: str) -> Checkpoint:
    lines = body.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("a checkpoint body is <origin>, <size> and <root> lines")
    origin, size, root = lines[0], lines[1], lines[2]
    if not origin:
        raise NoteError("the checkpoint's origin is empty")
    if not _SIZE_RE.match(size) or int(size) > TREE_SIZE_MAX:
        raise NoteError(f"the checkpoint's size {size!r} is not a decimal number")
    raw_root = _b64decode(root, "the checkpoint's root hash")
    if len(raw_root) != 32:
        raise NoteError("the checkpoint's root hash is not 32 bytes")
    if any(not line for line in lines[3:-1]):
        raise NoteError("the checkpoint has an empty extension line")
    return Checkpoint(origin, int(size), raw_root, tuple(lines[3:-1]))


def open_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """The checkpoint a signed note carries, once its signature by `key` verifies."""
    return parse_checkpoint(verify_note(note, key))


# --- witnesses' cosignatures -------------------------------------------------------------------------------------------
#
# Written from https://c2sp.org/tlog-cosignature (C2SP/C2SP tlog-cosignature.md), the Ed25519 type cosignature/v1:
#
#   witness key    <name>+<8 hex digits key id>+<base64(0x04 ‖ 32-byte Ed25519 public key)>
#   key id         the first 4 bytes of SHA-256(<name> ‖ 0x0A ‖ 0x04 ‖ public key)
#   cosignature    — <name> <base64(key id ‖ 8-byte big-endian timestamp ‖ 64-byte signature)>   (a note signature line)
#   signed message "cosignature/v1\n" "time <timestamp, decimal>\n" ‖ the checkpoint's whole body
#
# A cosignature says the witness checked, at that time, that this checkpoint is consistent with every earlier one it
# saw for the origin: a quorum of independent witnesses rules out a split view.

ALG_COSIGNATURE_V1: Final = 0x04
COSIGNATURE_BYTES: Final = 4 + 8 + 64


def cosignature_key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key).digest()[:4]


def cosigned_message(body: str, timestamp: int) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + body.encode()


def parse_witness_key(text: str) -> VerifierKey:
    """`name+hexkeyid+base64(0x04‖pub)`: a witness's cosignature/v1 verifier key; the key id must match."""
    text = text.strip()
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise NoteError("a witness key is <name>+<key id>+<key>")
    name, hex_id, b64_key = parts
    if not _NAME_RE.match(name):
        raise NoteError(f"the witness key name {name!r} is empty or has whitespace or '+'")
    if not re.fullmatch(r"[0-9a-f]{8}", hex_id):
        raise NoteError(f"the witness key id {hex_id!r} is not 8 lowercase hex digits")
    raw = _b64decode(b64_key, "the witness key")
    if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
        raise NoteError(f"the witness key {name} is not a cosignature/v1 key (0x04 followed by 32 bytes)")
    if cosignature_key_id(name, raw[1:]) != bytes.fromhex(hex_id):
        raise NoteError(f"the witness key id {hex_id} does not match the key name and public key")
    return VerifierKey(name, bytes.fromhex(hex_id), Ed25519PublicKey.from_public_bytes(raw[1:]), text)


def load_witness_key(arg: str) -> VerifierKey:
    """`arg` is the key itself or a file holding it."""
    if Path(arg).is_file():
        return parse_witness_key(Path(arg).read_text())
    return parse_witness_key(arg)


def cosignature_time(note: str, body: str, witness: VerifierKey) -> int | None:
    """The timestamp of `witness`'s valid cosignature of the checkpoint `body` in `note`, or None when the note
    carries no line of that key (lines of other keys are not its to judge). A line that names the key but does not
    verify is a forgery, or a witness that is not who it says: NoteError."""
    split = note.rfind("\n\n")
    if split < 0 or note[:split + 1] != body:
        raise NoteError("the note's body is not the checkpoint verified")
    for line in note[split + 2:].rstrip("\n").split("\n"):
        fields = line[len(SIGNATURE_PREFIX):].split(" ") if line.startswith(SIGNATURE_PREFIX) else []
        if len(fields) != 2:
            raise NoteError(f"signature line {line[:80]!r} is not '— <name> <signature>'")
        name, b64_sig = fields
        raw = _b64decode(b64_sig, f"the signature of {name}")
        if name != witness.name or raw[:4] != witness.key_id:
            continue
        if len(raw) != COSIGNATURE_BYTES:
            raise NoteError(f"the cosignature by {name} is {len(raw)} bytes, not {COSIGNATURE_BYTES}")
        timestamp = int.from_bytes(raw[4:12], "big")
        if timestamp > TREE_SIZE_MAX:
            raise NoteError(f"the cosignature by {name} has a timestamp beyond 2^63 - 1")
        try:
            witness.public_key.verify(raw[12:], cosigned_message(body, timestamp))
        except InvalidSignature:
            raise NoteError(f"the cosignature by {name} ({witness.key_id.hex()}) is not valid for this "
                            f"checkpoint: forged, or of another checkpoint") from None
        return timestamp
    return None


def check_quorum(note: str, body: str, witnesses: list[VerifierKey], quorum: int) -> list[str]:
    """The names of the witnesses that cosigned; NoteError unless at least `quorum` of them did (or one forged)."""
    signed = [cosignature_time(note, body, w) is not None for w in witnesses]
    cosigned = [w.name for w, ok in zip(witnesses, signed) if ok]
    if len(cosigned) < quorum:
        missing = [w.text for w, ok in zip(witnesses, signed) if not ok]
        raise NoteError(f"{len(cosigned)} of the {len(witnesses)} witnesses given cosigned it, fewer than the quorum "
                        f"of {quorum}; no valid cosignature by: {', '.join(missing)}")
    return cosigned
