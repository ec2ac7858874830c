"""Tokens signed with public keys (CONTRACT.md, second release): every service verifies EdDSA JWTs with the public
keys it serves at /.well-known/jwks.json, refuses each bad token with 401 `unauthorized`, follows key rotation
without a restart, takes its keys from an identity provider's URL when told to, and refuses a revoked `jti` within
5 seconds of the admin's revocation on the issuing service.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import signal
import time
import uuid

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from schemas.limits import TOKEN_REVOCATION_WINDOW_S
from services import cli
from services.common import auth, jwks
from services.common.settings import DEFAULT_TOKEN_AUDIENCE, DEFAULT_TOKEN_ISSUER
from tests.harness import eventually, free_port

ROTATION_WAIT_S = 10.0  # a service re-reads its key file every second: far inside this
IDP_REFRESH_WAIT_S = 30.0  # an unknown kid makes the service fetch the identity provider's keys again within 10 s


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**extra) -> dict:
    now = int(time.time())
    return {"iss": DEFAULT_TOKEN_ISSUER, "aud": DEFAULT_TOKEN_AUDIENCE, "sub": "admin", "role": "admin", "iat": now,
            "exp": now + 600, "jti": str(uuid.uuid4()), **extra}


def hs256(secret: bytes, header: dict, payload: dict) -> str:
    """An HS256 token made by hand (PyJWT itself refuses an asymmetric key as an HMAC secret)."""
    signing_input = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())).encode()
    return signing_input.decode() + "." + b64(hmac.new(secret, signing_input, hashlib.sha256).digest())


def probes(w) -> dict[str, str]:
    """One call per service that needs a token and answers without further setup (404: authenticated, no such
    voucher)."""
    return {"issuing": f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}",
            "redemption": f"{w.redemption}/v1/vouchers/{uuid.uuid4()}",
            "ledger": f"{w.ledger}/v1/trial-balance"}


ACCEPTED = {"issuing": 200, "redemption": 404, "ledger": 200}


async def statuses(api, w, token: str | None) -> dict[str, tuple[int, str | None]]:
    out = {}
    for service, url in probes(w).items():
        r = await api.call("GET", url, token=token)
        out[service] = (r.status, r.body.get("code") if isinstance(r.body, dict) else None)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if (sample == name or sample.startswith(name + "{")) and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            total += float(value)
    return total


# --- without the services ----------------------------------------------------------------------------------------------

def test_rotate_and_retire_keys_with_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CVL_RUN_DIR", str(tmp_path))
    monkeypatch.delenv(jwks.SIGNING_ENV, raising=False)
    assert cli.main(["token", "init"]) == 0
    first = capsys.readouterr().out.split()[0]
    assert cli.main(["token", "rotate-key"]) == 0
    second = capsys.readouterr().out.strip()
    assert cli.main(["token", "issue", "--role", "provider", "--provider", "aliyun", "--ttl", "15m"]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": second, "typ": "JWT"}

    public = json.loads((tmp_path / "token-jwks.json").read_text())
    assert [k["kid"] for k in public["keys"]] == [first, second]
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and "d" not in k for k in public["keys"])
    assert (tmp_path / "token-signing.jwk").stat().st_mode & 0o777 == 0o600

    assert cli.main(["token", "retire-key", second]) == 2, "the key that signs cannot be retired"
    assert cli.main(["token", "retire-key", "no-such-kid"]) == 2
    assert cli.main(["token", "retire-key", first]) == 0
    assert [k["kid"] for k in json.loads((tmp_path / "token-jwks.json").read_text())["keys"]] == [second]
    v = auth.Verifier(service="test", issuer=DEFAULT_TOKEN_ISSUER, audience=DEFAULT_TOKEN_AUDIENCE)
    v.set_keys(jwks.parse_public_set((tmp_path / "token-jwks.json").read_bytes()))
    principal = v.verify(f"Bearer {token}")
    assert (principal.role, principal.provider, principal.exp - principal.iat) == ("provider", "aliyun", 900)


def test_a_public_key_set_with_private_material_is_refused():
    key = jwks.new_private_jwk()
    with pytest.raises(jwks.KeySetError, match="private"):
        jwks.parse_public_set(json.dumps({"keys": [key]}).encode())
    assert jwks.parse_public_set(json.dumps({"keys": [{"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"},
                                                      jwks.public_jwk(key)]}).encode()).keys() == {key["kid"]}


def test_a_key_file_is_read_again_only_when_it_changed_and_a_broken_one_keeps_the_last_good_keys(tmp_path):
    keys = jwks.file_signing_keys(tmp_path)
    loaded: list[jwks.PublicKeys] = []
    source = jwks.FileSource(tmp_path / jwks.PUBLIC_FILE, loaded.append)
    source.load()
    source.load()
    assert [list(k) for k in loaded] == [[keys.current["kid"]]], "unchanged: not parsed again"
    (tmp_path / jwks.PUBLIC_FILE).write_text("{not json")
    with pytest.raises(jwks.KeySetError):
        source.load()
    assert len(loaded) == 1, "the verifier keeps the keys it had"


# --- against the services ------------------------------------------------------------------------------------------

async def test_every_service_serves_the_public_keys_it_accepts(world_factory, api, stack):
    w = await world_factory(1000)
    expected = stack.signing_keys().public_set()
    for url in (w.issuing, w.redemption, w.ledger):
        r = await api.call("GET", f"{url}/.well-known/jwks.json")
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/jwk-set+json")
        assert r.body == expected
        assert all(set(k) == {"kty", "crv", "kid", "alg", "use", "x"} for k in r.body["keys"])


async def test_every_bad_token_is_401_on_every_service(world_factory, api, stack):
    w = await world_factory(1000)
    assert await statuses(api, w, w.admin) == {s: (c, None if c == 200 else "not_found") for s, c in ACCEPTED.items()}

    keys = stack.signing_keys()
    kid, _ = keys.private_key()
    stranger = jwks.SigningKeys([jwks.new_private_jwk()])
    stranger_kid, stranger_key = stranger.private_key()
    published = (await api.call("GET", f"{w.ledger}/.well-known/jwks.json")).body
    jwk = next(k for k in published["keys"] if k["kid"] == kid)
    x = base64.urlsafe_b64decode(jwk["x"] + "=")
    pem = jwks.parse_public_set(json.dumps(published).encode())[kid].public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    now = int(time.time())

    bad = {
        "alg none": jwt.encode(claims(), None, algorithm="none", headers={"kid": kid}),
        "alg none, no signature part": jwt.encode(claims(), None, algorithm="none", headers={"kid": kid})[:-1],
        "HS256, a random secret": hs256(b"s" * 32, hs_header, claims()),
        # Algorithm confusion: an HMAC keyed with what we publish, in every form it is published or derived.
        "HS256, secret = the JWK Set as served": hs256(json.dumps(published).encode(), hs_header, claims()),
        "HS256, secret = the JWK": hs256(json.dumps(jwk).encode(), hs_header, claims()),
        "HS256, secret = x": hs256(x, hs_header, claims()),
        "HS256, secret = x as text": hs256(jwk["x"].encode(), hs_header, claims()),
        "HS256, secret = the PEM public key": hs256(pem, hs_header, claims()),
        "RS256 header": hs256(b"s", {"alg": "RS256", "kid": kid}, claims()),
        "unknown kid": jwt.encode(claims(), stranger_key, algorithm="EdDSA", headers={"kid": stranger_kid}),
        "no kid": jwt.encode(claims(), keys.private_key()[1], algorithm="EdDSA"),
        "bad signature (another key, our kid)": jwt.encode(claims(), stranger_key, algorithm="EdDSA",
                                                           headers={"kid": kid}),
        "exp passed": stack.token("admin", ttl_s=-10),
        "nbf in the future": stack.token("admin", not_before=now + 3600),
        "wrong iss": stack.token("admin", issuer="https://evil.example"),
        "wrong aud": stack.token("admin", audience="someone-else"),
        "no jti": jwt.encode({k: v for k, v in claims().items() if k != "jti"}, keys.private_key()[1],
                             algorithm="EdDSA", headers={"kid": kid}),
        "unknown role": jwt.encode(claims(role="root"), keys.private_key()[1], algorithm="EdDSA",
                                   headers={"kid": kid}),
        "garbage": "not-a-jwt",
    }
    before = metric((await api.call("GET", f"{w.ledger}/metrics")).body, "cvl_token_refusals_total")
    assert await statuses(api, w, None) == {s: (401, "unauthorized") for s in ACCEPTED}, "no token"
    for name, token in bad.items():
        assert await statuses(api, w, token) == {s: (401, "unauthorized") for s in ACCEPTED}, name
    after = (await api.call("GET", f"{w.ledger}/metrics")).body
    assert metric(after, "cvl_token_refusals_total") - before == len(bad) + 1
    for reason in ("missing", "algorithm", "unknown_kid", "signature", "expired", "not_yet_valid", "issuer",
                   "audience", "claims", "malformed"):
        assert metric(after, "cvl_token_refusals_total", service="ledger", reason=reason) >= 1, reason
    assert (await w.budget())["committed"] == 0


async def test_a_revoked_token_is_refused_by_every_service_within_five_seconds(world_factory, api, stack):
    w = await world_factory(1000)
    victim = stack.token("admin", sub="leaked-laptop", jti=f"leaked-{uuid.uuid4()}")
    other = stack.token("admin", sub="still-fine")
    assert await statuses(api, w, victim) == await statuses(api, w, other)  # both accepted, and cached
    payload = jwt.decode(victim, options={"verify_signature": False})
    url = f"{w.issuing}/v1/tokens/revoke"
    body = {"jti": payload["jti"], "exp": payload["exp"]}

    for token in (w.issuer, w.auditor, w.provider_tokens[w.providers[0]]):
        assert (await api.call("POST", url, token=token, json=body)).status == 403
    for bad_body, field in (({"jti": "", "exp": 1}, "jti"), ({"jti": "x"}, "exp"),
                            ({"jti": "x", "exp": int(time.time()) + 400 * 86400}, "exp")):
        r = await api.call("POST", url, token=w.admin, json=bad_body)
        assert (r.status, r.body["code"], r.body.get("field")) == (422, "validation_error", field), bad_body

    r = await api.call("POST", url, token=w.admin, json=body)
    revoked_at = time.monotonic()
    assert r.status == 200, r.body
    assert (r.body["jti"], r.body["exp"]) == (body["jti"], body["exp"])

    refused_after: dict[str, float] = {}

    async def refused_everywhere() -> bool:
        for service, (status, code) in (await statuses(api, w, victim)).items():
            if status == 401 and code == "unauthorized":
                refused_after.setdefault(service, time.monotonic() - revoked_at)
        return len(refused_after) == len(ACCEPTED)
    await eventually(refused_everywhere, timeout_s=TOKEN_REVOCATION_WINDOW_S * 2, interval_s=0.05)
    assert max(refused_after.values()) < TOKEN_REVOCATION_WINDOW_S, refused_after
    assert await statuses(api, w, other) == {s: (c, None if c == 200 else "not_found") for s, c in ACCEPTED.items()}

    again = await api.call("POST", url, token=w.admin, json=body)
    assert (again.status, again.body) == (200, r.body), "revoking again changes nothing"

    # A process that starts later reads the revocation before it answers anything.
    late = stack.start("issuing")
    try:
        await stack.wait_ready(late)
        r = await api.call("GET", f"{late.url}/v1/cities/{w.city}/budgets/{w.year}", token=victim)
        assert (r.status, r.body["code"]) == (401, "unauthorized")
        assert (await api.call("GET", f"{late.url}/v1/cities/{w.city}/budgets/{w.year}", token=other)).status == 200
    finally:
        stack.kill(late, signal.SIGTERM)


async def test_a_rotated_key_signs_the_old_one_verifies_until_retired(world_factory, api, stack, tmp_path,
                                                                       monkeypatch, capsys):
    """The operator's procedure, with the CLI, against a service with its own key files (the stack's keys stay)."""
    w = await world_factory(1000)
    monkeypatch.setenv("CVL_RUN_DIR", str(tmp_path))
    monkeypatch.delenv(jwks.SIGNING_ENV, raising=False)

    def cvl(*args: str) -> str:
        capsys.readouterr()
        assert cli.main(list(args)) == 0, args
        return capsys.readouterr().out.strip()

    old_kid = cvl("token", "init").split()[0]
    proc = stack.start("issuing", extra_env={"CVL_TOKEN_JWKS_FILE": str(tmp_path / jwks.PUBLIC_FILE)})
    try:
        await stack.wait_ready(proc)
        url = f"{proc.url}/v1/cities/{w.city}/budgets/{w.year}"
        old = cvl("token", "issue", "--role", "admin")
        assert (await api.call("GET", url, token=old)).status == 200
        assert (await api.call("GET", url, token=w.admin)).status == 401, "the stack's keys are not this one's"

        new_kid = cvl("token", "rotate-key")
        new = cvl("token", "issue", "--role", "admin")
        assert jwt.get_unverified_header(new)["kid"] == new_kid != old_kid

        async def accepted() -> bool:
            return (await api.call("GET", url, token=new)).status == 200
        await eventually(accepted, timeout_s=ROTATION_WAIT_S)
        assert (await api.call("GET", url, token=old)).status == 200, "the previous key still verifies"
        served = (await api.call("GET", f"{proc.url}/.well-known/jwks.json")).body
        assert [k["kid"] for k in served["keys"]] == [old_kid, new_kid]

        cvl("token", "retire-key", old_kid)

        async def old_refused() -> bool:
            r = await api.call("GET", url, token=old)
            return r.status == 401 and r.body["code"] == "unauthorized"
        await eventually(old_refused, timeout_s=ROTATION_WAIT_S)
        assert (await api.call("GET", url, token=new)).status == 200
        served = (await api.call("GET", f"{proc.url}/.well-known/jwks.json")).body
        assert [k["kid"] for k in served["keys"]] == [new_kid]
    finally:
        stack.kill(proc, signal.SIGTERM)


async def test_an_external_identity_provider_stands_in_for_cvl_token_issue(world_factory, api, stack):
    w = await world_factory(1000)
    idp_keys = [jwks.new_private_jwk()]
    fetches = []

    async def jwks_json(request: web.Request) -> web.Response:
        fetches.append(time.monotonic())
        return web.json_response({"keys": [{"kty": "RSA", "kid": "rsa-1", "n": "AQAB", "e": "AQAB"},
                                           *(jwks.public_jwk(k) for k in idp_keys)]})

    idp = web.Application()
    idp.router.add_get("/jwks", jwks_json)
    runner = web.AppRunner(idp)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    issuer, audience = "https://idp.example/realms/cvl", "cvl-prod"

    def idp_token(key: dict, **extra) -> str:
        signing = jwks.SigningKeys([key])
        return auth.issue(signing, role="issuer", city=w.city, issuer=issuer, audience=audience, ttl_s=600, **extra)

    proc = stack.start("issuing", extra_env={"CVL_TOKEN_JWKS_URL": f"http://127.0.0.1:{port}/jwks",
                                             "CVL_TOKEN_ISSUER": issuer, "CVL_TOKEN_AUDIENCE": audience})
    try:
        await stack.wait_ready(proc)
        url = f"{proc.url}/v1/cities/{w.city}/budgets/{w.year}"
        r = await api.call("GET", url, token=idp_token(idp_keys[0]))
        assert r.status == 200, r.body
        served = (await api.call("GET", f"{proc.url}/.well-known/jwks.json")).body
        assert [k["kid"] for k in served["keys"]] == [idp_keys[0]["kid"]], "only the Ed25519 keys it accepts"
        assert (await api.call("GET", url, token=w.admin)).status == 401, "our own issuer is not trusted here"

        # The identity provider rotates: the first token with the new kid makes the service fetch again.
        idp_keys.append(jwks.new_private_jwk())
        rotated = idp_token(idp_keys[1])

        async def accepted() -> bool:
            return (await api.call("GET", url, token=rotated)).status == 200
        await eventually(accepted, timeout_s=IDP_REFRESH_WAIT_S, interval_s=0.5)
        assert len(fetches) >= 2
    finally:
        stack.kill(proc, signal.SIGTERM)
        await runner.cleanup()
