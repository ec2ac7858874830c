"""Bearer tokens (HS256 JWTs signed with the key from settings) and the role/scope rules of CONTRACT.md."""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Final, Literal

import msgspec

from .errors import Forbidden, Unauthorized
from schemas.limits import TOKEN_CACHE_MAX, TOKEN_LENGTH_MAX

Role = Literal["admin", "issuer", "provider", "auditor"]
ROLES: Final = ("admin", "issuer", "provider", "auditor")


class Principal(msgspec.Struct, kw_only=True, frozen=True):
    sub: str
    role: Role
    city: str | None = None
    provider: str | None = None
    exp: int
    iat: int

    @property
    def subject(self) -> str:
        """Who acts, as written into events' `actor` and idempotency scopes."""
        scope = self.city or self.provider
        return f"{self.role}:{scope}" if scope else self.role


_HEADER: Final = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
_claims_decoder = msgspec.json.Decoder(Principal)
_encoder = msgspec.json.Encoder()


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _unb64(raw: bytes) -> bytes:
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


def issue(key: bytes, *, role: Role, city: str | None = None, provider: str | None = None, ttl_s: int,
          sub: str | None = None) -> str:
    if role == "issuer" and not city:
        raise ValueError("an issuer token needs --city")
    if role == "provider" and not provider:
        raise ValueError("a provider token needs --provider")
    now = int(time.time())
    claims = Principal(sub=sub or role, role=role, city=city, provider=provider, iat=now, exp=now + ttl_s)
    signing_input = _HEADER + b"." + _b64(_encoder.encode(claims))
    signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + _b64(signature)).decode()


# Tokens already verified, by (signing key, raw header): a client sends the same token with every request, and a
# verified token stays valid until its `exp`, which is checked again on every use. Bounded: the oldest entry goes first.
_verified: dict[tuple[bytes, str], Principal] = {}


def verify(key: bytes, authorization: str | None) -> Principal:
    cached = _verified.get((key, authorization)) if authorization else None  # type: ignore[arg-type]
    if cached is not None:
        if cached.exp < time.time():
            _verified.pop((key, authorization), None)  # type: ignore[arg-type]
            raise Unauthorized("the bearer token has expired")
        return cached
    principal = _verify(key, authorization)
    if len(_verified) >= TOKEN_CACHE_MAX:
        del _verified[next(iter(_verified))]
    _verified[(key, authorization)] = principal  # type: ignore[index]
    return principal


def subject_of(key: bytes, authorization: str) -> str | None:
    """The subject of a valid bearer token, or None: verified once, then read from the cache above (the handler's
    own `verify` of the same header then finds it there too)."""
    try:
        return verify(key, authorization).subject
    except Unauthorized:
        return None


def _verify(key: bytes, authorization: str | None) -> Principal:
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized("an Authorization: Bearer token is required")
    token = authorization[7:].strip().encode()
    if len(token) > TOKEN_LENGTH_MAX or token.count(b".") != 2:
        raise Unauthorized("the bearer token is malformed")
    header, payload, signature = token.split(b".")
    expected = hmac.new(key, header + b"." + payload, hashlib.sha256).digest()
    try:
        if header != _HEADER or not hmac.compare_digest(_unb64(signature), expected):
            raise Unauthorized("the bearer token's signature is not valid")
        principal = _claims_decoder.decode(_unb64(payload))
    except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise Unauthorized("the bearer token is malformed") from exc
    if principal.exp < time.time():
        raise Unauthorized("the bearer token has expired")
    return principal


def require(principal: Principal, *roles: Role, city: str | None = None, provider: str | None = None) -> None:
    """Allow the call when the principal has one of `roles` and, for scoped roles, the matching scope.

    Issuers are scoped to a city, providers to their own id; an auditor with a city sees only that city.
    """
    if principal.role not in roles:
        raise Forbidden(f"role {principal.role} may not make this call")
    if principal.role == "issuer" and principal.city != city:
        raise Forbidden(f"this issuer token is for city {principal.city}, not {city}")
    if principal.role == "provider" and provider is not None and principal.provider != provider:
        raise Forbidden(f"this provider token is for {principal.provider}, not {provider}")
    if principal.role == "auditor" and principal.city is not None and city is not None and principal.city != city:
        raise Forbidden(f"this auditor token is for city {principal.city}, not {city}")


def parse_ttl(text: str) -> int:
    """'90s', '15m', '1h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)
