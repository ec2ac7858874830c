"""Bearer tokens (EdDSA JWTs through PyJWT, verified with public keys only) and the role/scope rules of CONTRACT.md.

Claims: `iss`, `aud`, `sub`, `role`, `city`?, `provider`?, `iat`, `nbf`?, `exp`, `jti`; header `kid` names the key.
Every refusal is 401 `unauthorized` and is counted by reason (`cvl_token_refusals_total`).
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Final, Literal

import jwt
import msgspec

from schemas.limits import TOKEN_CACHE_MAX, TOKEN_LEEWAY_S, TOKEN_LENGTH_MAX, TOKEN_TTL_S_MAX

from . import jwks, metrics
from .errors import Forbidden, Unauthorized

Role = Literal["admin", "issuer", "provider", "auditor"]
ROLES: Final = ("admin", "issuer", "provider", "auditor")
REQUIRED_CLAIMS: Final = ["iss", "aud", "sub", "iat", "exp", "jti"]


class Principal(msgspec.Struct, kw_only=True, frozen=True):
    sub: str
    role: Role
    city: str | None = None
    provider: str | None = None
    exp: int
    iat: int
    jti: str

    @property
    def subject(self) -> str:
        """Who acts, as written into events' `actor` and idempotency scopes."""
        scope = self.city or self.provider
        return f"{self.role}:{scope}" if scope else self.role


def issue(keys: jwks.SigningKeys, *, role: Role, issuer: str, audience: str, ttl_s: int, city: str | None = None,
          provider: str | None = None, sub: str | None = None, not_before: int | None = None,
          jti: str | None = None) -> str:
    """A token signed with the set's current key (`cvl token issue`, the demo seed and the dev stack; never a
    service)."""
    if role == "issuer" and not city:
        raise ValueError("an issuer token needs --city")
    if role == "provider" and not provider:
        raise ValueError("a provider token needs --provider")
    now = int(time.time())
    claims: dict[str, object] = {"iss": issuer, "aud": audience, "sub": sub or role, "role": role, "iat": now,
                                 "exp": now + ttl_s, "jti": jti or str(uuid.uuid4())}
    if city:
        claims["city"] = city
    if provider:
        claims["provider"] = provider
    if not_before is not None:
        claims["nbf"] = not_before
    kid, key = keys.private_key()
    return jwt.encode(claims, key, algorithm=jwks.ALGORITHM, headers={"kid": kid})


class Refused(Unauthorized):
    """A 401 with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


_JWT_REFUSALS: Final[tuple[tuple[type[Exception], str, str], ...]] = (  # most specific first
    (jwt.ExpiredSignatureError, "expired", "the bearer token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "the bearer token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidIssuerError, "issuer", "the bearer token's issuer (iss) is not the one trusted here"),
    (jwt.InvalidAudienceError, "audience", "the bearer token is not meant for this audience (aud)"),
    (jwt.InvalidSignatureError, "signature", "the bearer token's signature is not valid"),
    (jwt.MissingRequiredClaimError, "claims", "the bearer token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "algorithm", "the bearer token must be signed with EdDSA"),
)


class Verifier:
    """Verifies bearer tokens with the public keys a service accepts, remembers what it verified, and refuses
    revoked `jti`s.

    The cache: a client sends the same token with every request, so a verified token is kept (by its raw header,
    at most TOKEN_CACHE_MAX, the oldest goes first) and a hit costs a dict lookup and the `exp` comparison. It stays
    honest because everything that could make a cached token invalid removes it: `exp` is compared on every use, a
    revocation evicts the tokens with that `jti` as it arrives, and a key set that drops or changes a key empties
    the cache. (A token with `nbf` in the future is refused, never cached.)
    """

    def __init__(self, *, service: str, issuer: str, audience: str, on_unknown_kid: Callable[[], None] | None = None):
        self.service, self.issuer, self.audience = service, issuer, audience
        self.on_unknown_kid = on_unknown_kid
        self._keys: jwks.PublicKeys = {}
        self.document = jwks.document_of({})
        self._verified: dict[str, Principal] = {}
        self._revoked: dict[str, int] = {}  # jti -> exp, until exp has passed

    # --- what the key sources and the revocation listener tell it ---------------------------------------------------

    def set_keys(self, keys: jwks.PublicKeys) -> None:
        old = self._keys
        self._keys = dict(keys)
        self.document = jwks.document_of(self._keys)
        if any(kid not in keys or keys[kid] != key for kid, key in old.items()):
            self._verified.clear()  # a retired key: what it signed must verify again (and fail)

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def revoke(self, jti: str, exp: int) -> None:
        if exp <= time.time() - TOKEN_LEEWAY_S:
            return  # expired anyway: refused without being remembered
        self._revoked[jti] = max(exp, self._revoked.get(jti, exp))
        for header in [h for h, p in self._verified.items() if p.jti == jti]:
            del self._verified[header]

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def drop_expired_revocations(self) -> int:
        """Forget revocations of tokens that have expired since (they are refused as expired); how many."""
        now = time.time() - TOKEN_LEEWAY_S
        gone = [jti for jti, exp in self._revoked.items() if exp <= now]
        for jti in gone:
            del self._revoked[jti]
        return len(gone)

    @property
    def revoked_count(self) -> int:
        return len(self._revoked)

    # --- verification ---------------------------------------------------------------------------------------------------

    def verify(self, authorization: str | None, *, count: bool = True) -> Principal:
        cached = self._verified.get(authorization) if authorization else None  # type: ignore[arg-type]
        if cached is not None:
            if cached.exp > time.time() - TOKEN_LEEWAY_S:
                return cached
            del self._verified[authorization]  # type: ignore[arg-type]
            if count:
                metrics.token_refusals.labels(self.service, "expired").inc()
            raise Refused("expired", "the bearer token has expired")
        try:
            principal = self._verify(authorization)
        except Refused as exc:
            if count:
                metrics.token_refusals.labels(self.service, exc.reason).inc()
            raise
        if len(self._verified) >= TOKEN_CACHE_MAX:
            del self._verified[next(iter(self._verified))]
        self._verified[authorization] = principal  # type: ignore[index]
        return principal

    def subject_of(self, authorization: str) -> str | None:
        """The subject of a valid bearer token, or None: verified (and cached) once, so the handler's own `verify`
        of the same header finds it in the cache; a refusal is counted there, not here."""
        try:
            return self.verify(authorization, count=False).subject
        except Unauthorized:
            return None

    def _verify(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise Refused("missing", "an Authorization: Bearer token is required")
        token = authorization[7:].strip()
        if len(token) > TOKEN_LENGTH_MAX:
            raise Refused("malformed", f"the bearer token is longer than {TOKEN_LENGTH_MAX} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise Refused("malformed", "the bearer token is not a JWT") from exc
        # Checked before any key is looked at: `none`, HS256 (with whatever secret, a published public key
        # included) and every other algorithm are refused outright, so no key is ever used with another algorithm.
        if header.get("alg") != jwks.ALGORITHM:
            raise Refused("algorithm", f"the bearer token must be signed with {jwks.ALGORITHM}, "
                                       f"not {header.get('alg')!r}")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            if self.on_unknown_kid is not None:
                self.on_unknown_kid()
            raise Refused("unknown_kid", f"the bearer token's key {kid!r} is not one this service accepts")
        try:
            claims = jwt.decode(token, key, algorithms=[jwks.ALGORITHM], audience=self.audience, issuer=self.issuer,
                                leeway=TOKEN_LEEWAY_S, options={"require": REQUIRED_CLAIMS})
        except jwt.InvalidTokenError as exc:
            for kind, reason, detail in _JWT_REFUSALS:
                if isinstance(exc, kind):
                    raise Refused(reason, detail) from exc
            raise Refused("malformed", f"the bearer token is not valid: {exc}") from exc
        try:
            principal = msgspec.convert(claims, Principal)
        except msgspec.ValidationError as exc:
            raise Refused("claims", f"the bearer token's claims are not valid: {exc}") from exc
        now = time.time()
        if principal.exp <= now - TOKEN_LEEWAY_S:  # as PyJWT checked, on the clock the cache compares with
            raise Refused("expired", "the bearer token has expired")
        if principal.exp > now + TOKEN_TTL_S_MAX:
            # So that a revocation (kept as long as a token can live) always outlives the token it refuses.
            raise Refused("claims", f"the bearer token expires more than {TOKEN_TTL_S_MAX} s from now")
        if principal.jti in self._revoked:
            raise Refused("revoked", "the bearer token has been revoked")
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
