"""C2SP signed notes and tlog checkpoints (https://c2sp.org/signed-note, https://c2sp.org/tlog-checkpoint), verified
with the log's Ed25519 verifier key `<name>+<hex key id>+<base64(0x01 ‖ public key)>`. Signature lines of other keys
(witness cosignatures) are ignored here."""
from __future__ import annotations

import base64
import binascii
import hashlib
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import ProofError

ALG_ED25519 = 0x01
SIGNATURE_PREFIX = "\u2014 "  # an em dash and a space


class VerifierKey(NamedTuple):
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey
    text: str


class Checkpoint(NamedTuple):
    origin: str
    tree_size: int
    root: bytes
    note: str


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ProofError(f"{what} is not valid base64") from exc


def parse_verifier_key(text: str) -> VerifierKey:
    text = text.strip()
    parts = text.split("+", 2)
    if len(parts) != 3 or not parts[0] or any(c.isspace() for c in parts[0]):
        raise ProofError("a verifier key is <name>+<key id>+<base64 key>")
    name, hex_id, key_b64 = parts
    raw = _b64(key_b64, "the verifier key")
    if len(raw) != 33 or raw[0] != ALG_ED25519:
        raise ProofError("the verifier key is not an Ed25519 key")
    key_id = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if hex_id != key_id.hex():
        raise ProofError("the verifier key's id does not match its name and key")
    return VerifierKey(name, key_id, Ed25519PublicKey.from_public_bytes(raw[1:]), text)


def open_checkpoint(note: str, key: VerifierKey) -> Checkpoint:
    """The checkpoint in `note`, once a signature line of `key` over its body verifies; ProofError otherwise."""
    body, sep, signatures = note.partition("\n\n")
    if not sep:
        raise ProofError("not a signed note: no blank line before the signatures")
    body += "\n"
    for line in signatures.splitlines():
        if not line.startswith(SIGNATURE_PREFIX):
            if line:
                raise ProofError(f"not a signature line: {line[:60]!r}")
            continue
        name, _, sig_b64 = line[len(SIGNATURE_PREFIX):].partition(" ")
        if name != key.name:
            continue
        sig = _b64(sig_b64, "a signature")
        if len(sig) != 68 or sig[:4] != key.key_id:
            continue
        try:
            key.public_key.verify(sig[4:], body.encode())
        except InvalidSignature:
            raise ProofError(f"the log's signature on the checkpoint does not verify under {key.name}") from None
        break
    else:
        raise ProofError(f"the checkpoint carries no signature of {key.name}")
    lines = body.split("\n")
    if len(lines) < 4 or lines[0] != key.name:
        raise ProofError("the checkpoint's origin is not the key's name")
    if not lines[1].isdigit() or (len(lines[1]) > 1 and lines[1][0] == "0"):
        raise ProofError("the checkpoint's tree size is not a decimal number")
    root = _b64(lines[2], "the checkpoint's root hash")
    if len(root) != 32:
        raise ProofError("the checkpoint's root hash is not 32 bytes")
    return Checkpoint(lines[0], int(lines[1]), root, note)
