"""Token keys as JWKs (RFC 7517; Ed25519 as RFC 8037 `OKP`): the private signing set that `cvl token` keeps, the
public JWK Set the services verify with, and where the services get that set from (a file under `.run/`, re-read
when it changes, or an identity provider's URL, fetched again at a bounded interval).

Who holds what: `.run/token-signing.jwk` (mode 0600, or `CVL_TOKEN_SIGNING_KEY`) holds private keys and is read only
by `cvl token` and by the dev stack that signs the tests' tokens; `.run/token-jwks.json` is written from it and holds
the public halves only: the services read that file (or `CVL_TOKEN_JWKS_URL`) and never a private key.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.limits import (
    TOKEN_JWKS_BYTES_MAX, TOKEN_JWKS_FETCH_RETRY_S, TOKEN_JWKS_FETCH_TIMEOUT_S, TOKEN_JWKS_FILE_CHECK_S,
    TOKEN_JWKS_URL_REFRESH_MIN_S, TOKEN_JWKS_URL_REFRESH_S, TOKEN_KEYS_MAX,
)

from . import keyfile

log = logging.getLogger("cvl.jwks")

ALGORITHM: Final = "EdDSA"
SIGNING_FILE: Final = "token-signing.jwk"   # private: `cvl token` only
PUBLIC_FILE: Final = "token-jwks.json"      # public: what the services accept
SIGNING_ENV: Final = "CVL_TOKEN_SIGNING_KEY"
ED25519_KEY_BYTES: Final = 32

PublicKeys = dict[str, Ed25519PublicKey]  # kid -> key


class KeySetError(ValueError):
    """A JWK or JWK Set that is not what we accept."""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def thumbprint(x: str) -> str:
    """The RFC 7638 thumbprint of an Ed25519 public JWK (its required members, sorted, no whitespace): the kid."""
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def new_private_jwk() -> dict[str, str]:
    key = Ed25519PrivateKey.generate()
    d = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    x = _b64(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return {"kty": "OKP", "crv": "Ed25519", "kid": thumbprint(x), "alg": ALGORITHM, "use": "sig", "x": x,
            "d": _b64(d)}


def public_jwk(jwk: dict[str, Any]) -> dict[str, str]:
    """The public half of a JWK we made or accepted (never `d`)."""
    return {"kty": "OKP", "crv": "Ed25519", "kid": jwk["kid"], "alg": ALGORITHM, "use": "sig", "x": jwk["x"]}


def _check_okp(jwk: Any, *, private: bool) -> None:
    if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise KeySetError("a key must be a JWK with kty OKP and crv Ed25519")
    if not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
        raise KeySetError("a key must have a kid")
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        raise KeySetError(f"key {jwk['kid']}: alg must be {ALGORITHM} and use sig")
    members = ("x", "d") if private else ("x",)
    for name in members:
        if not isinstance(jwk.get(name), str) or len(_unb64(jwk[name])) != ED25519_KEY_BYTES:
            raise KeySetError(f"key {jwk['kid']}: {name} must be {ED25519_KEY_BYTES} bytes, base64url")


# --- the private signing set (`cvl token`) ------------------------------------------------------------------------

class SigningKeys:
    """Private Ed25519 JWKs, oldest first; the last one signs, the others still verify until they are retired."""

    def __init__(self, keys: list[dict[str, str]]):
        if not keys:
            raise KeySetError("the signing key set is empty")
        for jwk in keys:
            _check_okp(jwk, private=True)
            public = Ed25519PrivateKey.from_private_bytes(_unb64(jwk["d"])).public_key()
            if _b64(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)) != jwk["x"]:
                raise KeySetError(f"key {jwk['kid']}: x is not the public key of d")
        if len({k["kid"] for k in keys}) != len(keys):
            raise KeySetError("two signing keys share a kid")
        if len(keys) > TOKEN_KEYS_MAX:
            raise KeySetError(f"at most {TOKEN_KEYS_MAX} keys")
        self.keys = keys

    @property
    def current(self) -> dict[str, str]:
        return self.keys[-1]

    def private_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The kid and key that sign new tokens."""
        return self.current["kid"], Ed25519PrivateKey.from_private_bytes(_unb64(self.current["d"]))

    def public_set(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [public_jwk(k) for k in self.keys]}

    def encode(self) -> bytes:
        return (json.dumps({"keys": self.keys}, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> SigningKeys:
        """A JWK Set of private keys, or one private JWK (as `CVL_TOKEN_SIGNING_KEY` may hold)."""
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise KeySetError(f"the signing key is not JSON: {exc}") from exc
        keys = doc.get("keys") if isinstance(doc, dict) and "keys" in doc else [doc]
        if not isinstance(keys, list):
            raise KeySetError("keys must be a list")
        return cls(keys)


def signing_keys(run: Path) -> SigningKeys:
    """`CVL_TOKEN_SIGNING_KEY`, else `.run/token-signing.jwk`, created once (first start is race-safe); the public
    set `.run/token-jwks.json` is (re)written from a file-held set whenever it differs."""
    if env := os.environ.get(SIGNING_ENV):
        return SigningKeys.decode(env)
    return file_signing_keys(run)


def file_signing_keys(run: Path) -> SigningKeys:
    """`run/token-signing.jwk`, created once, and `run/token-jwks.json` written from it whenever it differs."""
    keys = SigningKeys.decode(keyfile.read_or_create(run / SIGNING_FILE,
                                                     lambda: SigningKeys([new_private_jwk()]).encode()))
    write_public(run / PUBLIC_FILE, keys)
    return keys


def public_document(keys: SigningKeys) -> bytes:
    return (json.dumps(keys.public_set(), indent=2) + "\n").encode()


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Readers see the old file or the new one, never half of one (rename is atomic; the name is ours alone)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_public(path: Path, keys: SigningKeys) -> None:
    document = public_document(keys)
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == document:
            return
    _write_atomically(path, document, 0o644)


@contextlib.contextmanager
def _locked(run: Path):
    """One `rotate-key`/`retire-key` at a time (two at once would each drop the other's change)."""
    with open(run / f".{SIGNING_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _change(run: Path, change: Callable[[list[dict[str, str]]], list[dict[str, str]]]) -> SigningKeys:
    if os.environ.get(SIGNING_ENV):
        raise KeySetError(f"the signing keys come from ${SIGNING_ENV}: change them where it is set")
    with _locked(run):
        keys = SigningKeys(change(list(file_signing_keys(run).keys)))
        _write_atomically(run / SIGNING_FILE, keys.encode(), 0o600)
        write_public(run / PUBLIC_FILE, keys)
    return keys


def rotate(run: Path) -> str:
    """Add a new signing key; it signs from now on, the older keys still verify. Returns its kid."""
    return _change(run, lambda keys: [*keys, new_private_jwk()]).current["kid"]


def retire(run: Path, kid: str) -> None:
    """Remove a key that no longer signs: tokens signed with it are refused once the services re-read the set."""
    def without(keys: list[dict[str, str]]) -> list[dict[str, str]]:
        if kid not in {k["kid"] for k in keys}:
            raise KeySetError(f"no key {kid}")
        if keys[-1]["kid"] == kid:
            raise KeySetError(f"{kid} is the key that signs: rotate-key first, then retire it")
        return [k for k in keys if k["kid"] != kid]
    _change(run, without)


# --- the public set the services accept ------------------------------------------------------------------------------

def parse_public_set(raw: bytes) -> PublicKeys:
    """The Ed25519 signing keys of a JWK Set. Keys of other types (an identity provider may also publish RSA keys)
    are skipped; a key carrying private material is refused, as is a set that is too large."""
    if len(raw) > TOKEN_JWKS_BYTES_MAX:
        raise KeySetError(f"the JWK Set is larger than {TOKEN_JWKS_BYTES_MAX} bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise KeySetError(f"the JWK Set is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise KeySetError("a JWK Set is an object with a list `keys`")
    if len(doc["keys"]) > TOKEN_KEYS_MAX:
        raise KeySetError(f"the JWK Set holds more than {TOKEN_KEYS_MAX} keys")
    keys: PublicKeys = {}
    for jwk in doc["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if "d" in jwk:
            raise KeySetError(f"key {jwk.get('kid')} holds private material: publish public keys only")
        _check_okp(jwk, private=False)
        if jwk["kid"] in keys:
            raise KeySetError(f"two keys share the kid {jwk['kid']}")
        keys[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(_unb64(jwk["x"]))
    return keys


def document_of(keys: PublicKeys) -> bytes:
    """The JWK Set a service serves at /.well-known/jwks.json: the keys it accepts, public members only."""
    out = []
    for kid, key in keys.items():
        x = _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        out.append(public_jwk({"kid": kid, "x": x}))
    return json.dumps({"keys": out}, separators=(",", ":")).encode()


KeysChanged = Callable[[PublicKeys], None]


class FileSource:
    """A JWK Set file, looked at every TOKEN_JWKS_FILE_CHECK_S and re-read when its identity, size or mtime
    changed (rotation without a restart). A file that breaks keeps the last good keys (and says so in the log)."""

    def __init__(self, path: Path, on_change: KeysChanged):
        self.path, self.on_change = path, on_change
        self._seen: tuple[int, int, int] | None = None
        self._failing: str | None = None  # the last error logged, so that a broken file is reported once

    def load(self) -> None:
        """Read the file now if it changed; raises when the first read fails (a service must start with keys)."""
        st = self.path.stat()
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        keys = parse_public_set(self.path.read_bytes())
        self._seen = seen
        self.on_change(keys)
        log.info("token keys loaded", extra={"path": str(self.path), "kids": sorted(keys)})

    def nudge(self) -> None:
        pass  # the file is looked at every second anyway

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TOKEN_JWKS_FILE_CHECK_S)
            try:
                self.load()
                self._failing = None
            except (OSError, KeySetError) as exc:
                if str(exc) != self._failing:
                    log.error("token keys not reloaded, the last good ones stay: %s", exc,
                              extra={"path": str(self.path)})
                self._failing = str(exc)


class UrlSource:
    """An identity provider's JWK Set, fetched every TOKEN_JWKS_URL_REFRESH_S, and sooner (at most every
    TOKEN_JWKS_URL_REFRESH_MIN_S) when a token names a kid we do not know: the provider may have rotated. A failed
    fetch keeps the last good keys and is retried after TOKEN_JWKS_FETCH_RETRY_S."""

    def __init__(self, url: str, on_change: KeysChanged, clock: Callable[[], float] = time.monotonic):
        self.url, self.on_change, self.clock = url, on_change, clock
        self._nudged = asyncio.Event()
        self._tried_at = float("-inf")  # the last fetch attempt, failed ones included: nudges never flood the IdP
        self._loaded = False

    async def load(self) -> None:
        self._tried_at = self.clock()
        timeout = aiohttp.ClientTimeout(total=TOKEN_JWKS_FETCH_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(self.url, headers={"Accept": "application/json"}) as r:
                if r.status != 200:
                    raise KeySetError(f"{self.url} answered {r.status}")
                raw = await r.content.read(TOKEN_JWKS_BYTES_MAX + 1)
        keys = parse_public_set(raw)
        self.on_change(keys)
        self._loaded = True
        log.info("token keys fetched", extra={"url": self.url, "kids": sorted(keys)})

    def nudge(self) -> None:
        self._nudged.set()

    async def run(self) -> None:
        wait_s = TOKEN_JWKS_URL_REFRESH_S if self._loaded else TOKEN_JWKS_FETCH_RETRY_S  # the start's fetch failed
        while True:
            try:
                await asyncio.wait_for(self._nudged.wait(), wait_s)
                since_s = self.clock() - self._tried_at
                if since_s < TOKEN_JWKS_URL_REFRESH_MIN_S:  # nudged soon after a fetch: wait out the minimum
                    await asyncio.sleep(TOKEN_JWKS_URL_REFRESH_MIN_S - since_s)
            except TimeoutError:
                pass  # the regular refresh (or the retry after a failure)
            self._nudged.clear()
            try:
                await self.load()
                wait_s = TOKEN_JWKS_URL_REFRESH_S
            except (OSError, aiohttp.ClientError, TimeoutError, KeySetError) as exc:
                log.error("token keys not fetched, the last good ones stay: %s", exc, extra={"url": self.url})
                wait_s = TOKEN_JWKS_FETCH_RETRY_S
