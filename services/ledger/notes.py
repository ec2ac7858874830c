"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed notes, signed with the log's Ed25519 key.

    body = origin "\\n" tree size (decimal) "\\n" base64(root) "\\n"                    (c2sp.org/tlog-checkpoint)
    note = body "\\n" "— " key name " " base64(key ID ‖ Ed25519 signature over body) "\\n"  (c2sp.org/signed-note)

The key name is the origin. key ID = SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ 32-byte public key)[:4]; the verifier key that
auditors configure (GET /v1/log/key) is `name+hex(key ID)+base64(0x01 ‖ public key)`, as Go's golang.org/x/mod/sumdb
/note and the C2SP tools print it.

The private key is a C2SP/Go note private key string, `PRIVATE+KEY+name+hex(key ID)+base64(0x01 ‖ 32-byte seed)`:
from the environment variable CVL_LOG_KEY when set (a key made elsewhere, e.g. by Go's note.GenerateKey), else from
`.run/log.key`, generated once on first start (mode 0600; the first of several starting replicas wins). Its name must
equal the origin (CVL_LOG_ORIGIN, default "cvl.example/ledger"): a log's checkpoints are signed under one name.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from pathlib import Path
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from schemas.limits import BIGINT_MAX, LOG_NAME_LENGTH_MAX, NOTE_LENGTH_MAX
from services.common import keyfile

ORIGIN_DEFAULT: Final = "cvl.example/ledger"
ORIGIN_ENV: Final = "CVL_LOG_ORIGIN"
KEY_ENV: Final = "CVL_LOG_KEY"
KEY_FILE: Final = "log.key"
ALG_ED25519: Final = 0x01
SEED_SIZE: Final = 32
KEY_ID_SIZE: Final = 4
SIGNATURE_SIZE: Final = 64
SIGNATURE_PREFIX: Final = "\u2014 "  # em dash, space
# A key name: non-empty, no Unicode space, no '+'; we also keep it printable ASCII so it is safe in any header.
_NAME_RE: Final = re.compile(rf"^[\x21-\x2a\x2c-\x7e]{{1,{LOG_NAME_LENGTH_MAX}}}$")
# A tree size: a decimal bigint without leading zeros (at most as many digits as BIGINT_MAX).
_SIZE_RE: Final = re.compile(rf"0|[1-9][0-9]{{0,{len(str(BIGINT_MAX)) - 1}}}")


class NoteError(ValueError):
    """A note, key or checkpoint that is malformed or does not verify."""


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise NoteError(f"{name!r} is not a key name (printable ASCII, no spaces, no '+', "
                        f"1-{LOG_NAME_LENGTH_MAX} characters)")
    return name


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public_key).digest()[:KEY_ID_SIZE]


class LogKey(NamedTuple):
    name: str
    private: Ed25519PrivateKey
    public: bytes                   # 32 bytes
    id: bytes                       # 4 bytes

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> LogKey:
        assert len(seed) == SEED_SIZE
        private = Ed25519PrivateKey.from_private_bytes(seed)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(check_name(name), private, public, key_id(name, public))

    def verifier(self) -> str:
        """The C2SP verifier key: `name+hexkeyid+base64(0x01 ‖ public key)`."""
        return f"{self.name}+{self.id.hex()}+{base64.b64encode(bytes([ALG_ED25519]) + self.public).decode()}"

    def sign(self, text: str) -> str:
        """`text` (ending in a newline) as a signed note with this key's one signature."""
        assert text.endswith("\n") and len(text) < NOTE_LENGTH_MAX, text
        signature = self.private.sign(text.encode())
        return f"{text}\n{SIGNATURE_PREFIX}{self.name} {base64.b64encode(self.id + signature).decode()}\n"


def format_private_key(name: str, seed: bytes) -> str:
    key = LogKey.from_seed(name, seed)
    return f"PRIVATE+KEY+{name}+{key.id.hex()}+{base64.b64encode(bytes([ALG_ED25519]) + seed).decode()}"


def parse_private_key(text: str) -> LogKey:
    parts = text.strip().split("+", 4)  # the base64 key may hold "+" too
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise NoteError("a log key is PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 ‖ seed)>")
    _, _, name, hex_id, encoded = parts
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise NoteError("the log key's last field is not base64") from exc
    if len(raw) != 1 + SEED_SIZE or raw[0] != ALG_ED25519:
        raise NoteError("the log key is not an Ed25519 key (0x01 followed by a 32-byte seed)")
    key = LogKey.from_seed(check_name(name), raw[1:])
    if key.id.hex() != hex_id.lower():
        raise NoteError(f"the log key's id {hex_id} does not match its name and public key ({key.id.hex()})")
    return key


def origin_from_env() -> str:
    return check_name(os.environ.get(ORIGIN_ENV, ORIGIN_DEFAULT))


def load_log_key(run_dir: Path, origin: str) -> LogKey:
    """The signing key: CVL_LOG_KEY, else `run_dir/log.key`, created once (the first process to link it wins)."""
    if text := os.environ.get(KEY_ENV):
        key, where = parse_private_key(text), KEY_ENV
    else:
        path = run_dir / KEY_FILE
        text = keyfile.read_or_create(
            path, lambda: (format_private_key(origin, os.urandom(SEED_SIZE)) + "\n").encode()).decode()
        key, where = parse_private_key(text), str(path)
    if key.name != origin:
        raise NoteError(f"the log key in {where} is named {key.name!r} but the log's origin is {origin!r}: "
                        f"set {ORIGIN_ENV}={key.name} or give a key of that name")
    return key


# --- checkpoints ------------------------------------------------------------------------------------------------------

class Checkpoint(NamedTuple):
    origin: str
    size: int
    root: bytes


def checkpoint_body(origin: str, size: int, root: bytes) -> str:
    assert size >= 0 and len(root) == 32
    return f"{check_name(origin)}\n{size}\n{base64.b64encode(root).decode()}\n"


def parse_checkpoint_body(text: str) -> Checkpoint:
    lines = text.split("\n")
    if len(lines) < 4 or lines[-1] != "":
        raise NoteError("a checkpoint is origin, size and root hash, each on its own line")
    origin, size, root = lines[0], lines[1], lines[2]
    if not _SIZE_RE.fullmatch(size):
        raise NoteError(f"the checkpoint's size {size!r} is not a decimal number")
    try:
        raw_root = base64.b64decode(root, validate=True)
    except binascii.Error as exc:
        raise NoteError("the checkpoint's root is not base64") from exc
    if len(raw_root) != 32:
        raise NoteError("the checkpoint's root is not 32 bytes")
    return Checkpoint(origin, int(size), raw_root)


def open_note(note: str, key: LogKey) -> Checkpoint:
    """The checkpoint in `note`, after checking `key`'s signature on it (used before signing the next one)."""
    text, sep, signatures = note.rpartition("\n\n")
    if not sep:
        raise NoteError("the note has no blank line before its signatures")
    text += "\n"
    for line in signatures.splitlines():
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError("a signature line does not start with an em dash")
        name, _, encoded = line[len(SIGNATURE_PREFIX):].partition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise NoteError("a signature is not base64") from exc
        if name != key.name or raw[:KEY_ID_SIZE] != key.id:
            continue            # signatures from other keys are ignored (C2SP signed-note)
        if len(raw) != KEY_ID_SIZE + SIGNATURE_SIZE:
            raise NoteError("the signature is not 64 bytes")
        try:
            Ed25519PublicKey.from_public_bytes(key.public).verify(raw[KEY_ID_SIZE:], text.encode())
        except InvalidSignature as exc:
            raise NoteError("the note's signature does not verify") from exc
        return parse_checkpoint_body(text)
    raise NoteError(f"the note carries no signature by {key.name}")


# --- witnesses' cosignatures ------------------------------------------------------------------------------------------
#
# c2sp.org/tlog-cosignature, the Ed25519 type `cosignature/v1`, as we read it (C2SP/C2SP tlog-cosignature.md):
#   key ID     SHA-256(<name> ‖ "\n" ‖ 0x04 ‖ 32-byte public key)[:4]
#   verifier   <name>+<hex key ID>+base64(0x04 ‖ public key)            (a C2SP signed-note vkey of type 0x04)
#   line       — <name> base64(key ID ‖ timestamp (u64, big-endian) ‖ 64-byte Ed25519 signature)
#   signed     "cosignature/v1\n" "time " <timestamp, decimal> "\n" ‖ the whole checkpoint body (no signature lines)
# A cosignature says: as of that time, this is the largest consistent tree the witness has seen for this origin.

ALG_COSIGNATURE_V1: Final = 0x04
TIMESTAMP_SIZE: Final = 8
COSIGNATURE_SIZE: Final = KEY_ID_SIZE + TIMESTAMP_SIZE + SIGNATURE_SIZE
# A witness's verifier key: name, 8 hex digits, base64 of 33 bytes (44 characters, no padding, so no '=').
_WITNESS_KEY_RE: Final = re.compile(r"([^+\s]+)\+([0-9a-f]{8})\+([A-Za-z0-9+/]{44})")


def cosignature_key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + public_key).digest()[:KEY_ID_SIZE]


def cosigned_message(body: str, timestamp: int) -> bytes:
    """What a cosignature/v1 signs: two header lines, then the checkpoint body as signed by the log."""
    assert 0 <= timestamp <= BIGINT_MAX and body.endswith("\n")
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body.encode()


class WitnessKey(NamedTuple):
    name: str
    public: bytes                   # 32 bytes
    id: bytes                       # 4 bytes

    def verifier(self) -> str:
        return (f"{self.name}+{self.id.hex()}+"
                f"{base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + self.public).decode()}")


def parse_witness_key(text: str) -> WitnessKey:
    """A witness's C2SP verifier key, `name+hexkeyid+base64(0x04 ‖ Ed25519 public key)`; the id must match."""
    match = _WITNESS_KEY_RE.fullmatch(text.strip())
    if not match:
        raise NoteError(f"{text.strip()[:80]!r} is not a witness verifier key (name+8 hex digits+base64 of 0x04 and "
                        f"an Ed25519 public key)")
    name, hex_id, encoded = match.groups()
    raw = base64.b64decode(encoded, validate=True)
    if len(raw) != 1 + SEED_SIZE or raw[0] != ALG_COSIGNATURE_V1:
        raise NoteError(f"the witness key {name} is not a cosignature/v1 Ed25519 key (type 0x04)")
    key = WitnessKey(check_name(name), raw[1:], cosignature_key_id(name, raw[1:]))
    if key.id.hex() != hex_id:
        raise NoteError(f"the witness key id {hex_id} does not match its name and public key ({key.id.hex()})")
    return key


class Cosignature(NamedTuple):
    line: str                       # "— name base64(...)", without its newline
    timestamp: int                  # seconds since the epoch, as the witness signed it


def find_cosignature(lines: str, body: str, key: WitnessKey) -> Cosignature | None:
    """The cosignature by `key` of the checkpoint `body` among signature `lines` (a witness's answer), or None when
    none of them names `key` (lines of other keys are ignored, as tlog-witness says). A line that names `key` but
    does not verify is a NoteError: a witness that answers with a bad signature is broken or not who it says."""
    for line in lines.splitlines():
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"{line[:80]!r} is not a signature line")
        name, _, encoded = line[len(SIGNATURE_PREFIX):].partition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise NoteError(f"the signature of {name} is not base64") from exc
        if name != key.name or raw[:KEY_ID_SIZE] != key.id:
            continue
        if len(raw) != COSIGNATURE_SIZE:
            raise NoteError(f"the cosignature by {name} is {len(raw)} bytes, not {COSIGNATURE_SIZE}")
        timestamp = int.from_bytes(raw[KEY_ID_SIZE:KEY_ID_SIZE + TIMESTAMP_SIZE], "big")
        if timestamp > BIGINT_MAX:
            raise NoteError(f"the cosignature by {name} has a timestamp beyond 2^63 - 1")
        try:
            Ed25519PublicKey.from_public_bytes(key.public).verify(raw[KEY_ID_SIZE + TIMESTAMP_SIZE:],
                                                                  cosigned_message(body, timestamp))
        except InvalidSignature as exc:
            raise NoteError(f"the cosignature by {name} does not verify") from exc
        return Cosignature(line, timestamp)
    return None


def note_body(note: str) -> str:
    """The text a signed note's signatures sign (up to and including the newline before the blank line)."""
    text, sep, _ = note.rpartition("\n\n")
    if not sep:
        raise NoteError("the note has no blank line before its signatures")
    return text + "\n"


if __name__ == "__main__":
    # `python -m services.ledger.notes`: print the log's verifier key, creating the key once exactly as the ledger
    # does (CVL_LOG_KEY, else .run/log.key), so deploy/services.sh can configure a witness before the ledger starts.
    from services.common import settings as _settings

    print(load_log_key(_settings.run_dir(), origin_from_env()).verifier())
