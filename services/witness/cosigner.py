"""The witness's key and its cosignatures (C2SP tlog-cosignature, cosignature/v1, Ed25519).

The key is kept in `.run/witness.key`, created once on first start (keyfile.py: several starting processes agree on
one), mode 0600, as `PRIVATE+KEY+<name>+<hex key id>+base64(0x04 ‖ 32-byte seed)`: the form of a C2SP/Go note private
key, with the cosignature/v1 type byte. Its verifier key, `<name>+<hex key id>+base64(0x04 ‖ public key)`, is what a
log (CVL_WITNESSES) and an auditor (`cvl audit verify --witness`) configure. Key ids and the signed message follow
tlog-cosignature, as the auditor's note.py reads them.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import Final, NamedTuple

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from services.audit import note
from services.common import keyfile

KEY_FILE: Final = "witness.key"
SEED_BYTES: Final = 32
_NAME_RE: Final = re.compile(r"[^\s+]+")   # signed-note: non-empty, no Unicode space, no '+'


class CosignerKey(NamedTuple):
    name: str
    private: Ed25519PrivateKey
    public: bytes
    id: bytes

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> CosignerKey:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not a key name (no spaces, no '+')")
        private = Ed25519PrivateKey.from_private_bytes(seed)
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(name, private, public, note.cosignature_key_id(name, public))

    def verifier(self) -> str:
        return (f"{self.name}+{self.id.hex()}+"
                f"{base64.b64encode(bytes([note.ALG_COSIGNATURE_V1]) + self.public).decode()}")

    def cosign(self, body: str, timestamp: int) -> str:
        """The signature line of our cosignature of the checkpoint `body` at `timestamp` (without its newline)."""
        signature = self.private.sign(note.cosigned_message(body, timestamp))
        raw = self.id + timestamp.to_bytes(8, "big") + signature
        return f"{note.SIGNATURE_PREFIX}{self.name} {base64.b64encode(raw).decode()}"


def format_private_key(name: str, seed: bytes) -> str:
    key = CosignerKey.from_seed(name, seed)
    return f"PRIVATE+KEY+{name}+{key.id.hex()}+{base64.b64encode(bytes([note.ALG_COSIGNATURE_V1]) + seed).decode()}"


def parse_private_key(text: str) -> CosignerKey:
    parts = text.strip().split("+", 4)
    if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
        raise ValueError("a witness key is PRIVATE+KEY+<name>+<hex key id>+<base64(0x04 ‖ seed)>")
    _, _, name, hex_id, encoded = parts
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ValueError("the witness key's last field is not base64") from None
    if len(raw) != 1 + SEED_BYTES or raw[0] != note.ALG_COSIGNATURE_V1:
        raise ValueError("the witness key is not a cosignature/v1 key (0x04 followed by a 32-byte seed)")
    key = CosignerKey.from_seed(name, raw[1:])
    if key.id.hex() != hex_id.lower():
        raise ValueError(f"the witness key's id {hex_id} does not match its name and public key")
    return key


def load_key(run_dir: Path, name: str) -> CosignerKey:
    """`run_dir/witness.key`, created once; its name must be the witness's configured name."""
    path = run_dir / KEY_FILE
    text = keyfile.read_or_create(path, lambda: (format_private_key(name, os.urandom(SEED_BYTES)) + "\n").encode())
    key = parse_private_key(text.decode())
    if key.name != name:
        raise ValueError(f"the witness key in {path} is named {key.name!r}, not {name!r}: set CVL_WITNESS_NAME="
                         f"{key.name} or move the file away (a witness's name and key go together)")
    return key
