"""Bad input and wrong credentials: a clear 4xx problem naming the field, never a 500, nothing written."""
from __future__ import annotations

import pytest



async def assert_nothing_minted(w) -> None:
    budget = await w.budget()
    assert budget["committed"] == 0, budget


@pytest.mark.parametrize("body, field", [
    ({"amount": 0}, "amount"),
    ({"amount": -5}, "amount"),
    ({"amount": 10**15 + 1}, "amount"),
    ({"amount": "7"}, "amount"),
    ({"amount": 7.5}, "amount"),
    ({"amount": True}, "amount"),
    ({"city": "Bad_City"}, "city"),
    ({"year": 1999}, "year"),
    ({"beneficiary": ""}, "beneficiary"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no offset
    ({"subsidy_ratio_bp": 0}, "subsidy_ratio_bp"),
    ({"subsidy_ratio_bp": 10001}, "subsidy_ratio_bp"),
    ({"kind": "gold"}, "kind"),
    ({"providers": ["NOT OK"]}, "providers[0]"),
    ({"surprise": 1}, "surprise"),
])
async def test_a_malformed_mint_is_422_naming_the_field_and_writes_nothing(world_factory, api, body, field):
    w = await world_factory(1000)
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(7) | body)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", field), r.body
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert {"type", "title", "status", "detail", "code"} <= r.body.keys()
    await assert_nothing_minted(w)


async def test_missing_fields_and_broken_json_are_422(world_factory, api):
    w = await world_factory(1000)
    body = w.mint_body(7)
    del body["amount"]
    r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=body)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "amount")
    for raw in (b"{not json", b"", b"[]", b"null", b'{"city": '):
        r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, data=raw,
                           headers={"Content-Type": "application/json"})
        assert (r.status, r.body["code"]) == (422, "validation_error"), raw
    await assert_nothing_minted(w)


async def test_an_oversize_body_is_413(world_factory, api):
    w = await world_factory(1000)
    raw = b'{"vouchers": [' + b" " * (1_048_576 + 10) + b"]}"
    r = await api.call("POST", f"{w.issuing}/v1/vouchers/batch", token=w.issuer, data=raw,
                       headers={"Content-Type": "application/json"})
    assert (r.status, r.body["code"]) == (413, "payload_too_large")
    await assert_nothing_minted(w)


async def test_a_bad_path_parameter_is_422_naming_it(world_factory, api):
    w = await world_factory(1000)
    r = await api.call("GET", f"{w.issuing}/v1/cities/{w.city}/budgets/20x6", token=w.admin)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "year")
    r = await api.call("PUT", f"{w.issuing}/v1/cities/UPPER", token=w.admin, json={"name": "x"})
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "city")
    r = await api.call("GET", f"{w.issuing}/v1/vouchers/not-a-uuid", token=w.admin)
    assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "voucher_id")


async def test_a_bad_idempotency_key_is_422(world_factory, api):
    w = await world_factory(1000)
    for key in ("", "a" * 256, "has space", "ключ"):
        r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=w.issuer, json=w.mint_body(7),
                           headers={"Idempotency-Key": key})
        assert (r.status, r.body["code"], r.body["field"]) == (422, "validation_error", "Idempotency-Key"), key
    await assert_nothing_minted(w)


async def test_no_token_or_a_bad_token_is_401(world_factory, api, stack):
    w = await world_factory(1000)
    url = f"{w.issuing}/v1/vouchers"
    assert (await api.call("POST", url, json=w.mint_body(7))).body["code"] == "unauthorized"
    forged = w.issuer[:-4] + ("AAAA" if not w.issuer.endswith("AAAA") else "BBBB")
    for token in ("garbage", forged, stack.token("issuer", city=w.city, ttl_s=-10)):
        r = await api.call("POST", url, token=token, json=w.mint_body(7))
        assert (r.status, r.body["code"]) == (401, "unauthorized"), token
    await assert_nothing_minted(w)


async def test_wrong_role_or_scope_is_403(world_factory, api, stack):
    w = await world_factory(1000)
    other_city_issuer = stack.token("issuer", city="somewhere-else")
    for token in (w.admin, w.auditor, other_city_issuer, w.provider_tokens[w.providers[0]]):
        r = await api.call("POST", f"{w.issuing}/v1/vouchers", token=token, json=w.mint_body(7))
        assert (r.status, r.body["code"]) == (403, "forbidden"), r.body
    r = await api.call("PUT", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=w.issuer,
                       json={"amount": 10**12})
    assert (r.status, r.body["code"]) == (403, "forbidden")
    r = await api.call("GET", f"{w.issuing}/v1/cities/{w.city}/budgets/{w.year}", token=other_city_issuer)
    assert (r.status, r.body["code"]) == (403, "forbidden")
    await assert_nothing_minted(w)
    assert (await w.budget())["amount"] == 1000


async def test_unknown_routes_and_methods_are_problems(stack, api):
    url = stack.url("issuing")
    r = await api.call("GET", f"{url}/v1/nothing-here")
    assert (r.status, r.body["code"]) == (404, "not_found")
    r = await api.call("DELETE", f"{url}/v1/vouchers")
    assert (r.status, r.body["code"]) == (405, "method_not_allowed")


async def test_health_ready_metrics_and_openapi(stack, api):
    for service, procs in stack.procs.items():
        url = procs[0].url
        assert (await api.call("GET", f"{url}/healthz")).status == 200
        ready = await api.call("GET", f"{url}/readyz")
        assert ready.status == 200 and ready.body["checks"] == {"postgres": True, "kafka": True}
        metrics = await api.call("GET", f"{url}/metrics")
        assert metrics.status == 200 and "cvl_http_requests_total" in metrics.body
        spec = await api.call("GET", f"{url}/openapi.json")
        assert spec.status == 200 and spec.body["openapi"] == "3.1.0" and spec.body["paths"], service
