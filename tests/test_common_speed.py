"""The shared per-event shortcuts keep their meaning: the relay's partitioner is the producer's, a cached token is
still refused once expired, and a consumer claims only the events its handler acts on. No stack needed."""
from __future__ import annotations

import contextlib
import os
import time

import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2 as aiokafka_murmur2

from schemas import events as ev
from services.common import auth, jwks, kafka, outbox
from services.common.consumer import CLAIM_SQL, Consumer, of_types
from services.common.errors import Unauthorized
from services.common.settings import Settings

KEYS = jwks.SigningKeys([jwks.new_private_jwk()])
OTHER_KEYS = jwks.SigningKeys([jwks.new_private_jwk()])


def verifier(keys: jwks.SigningKeys = KEYS) -> auth.Verifier:
    v = auth.Verifier(service="test", issuer="iss", audience="cvl")
    v.set_keys(jwks.parse_public_set(jwks.public_document(keys)))
    return v


def issue(**kw) -> str:
    return auth.issue(KEYS, issuer="iss", audience="cvl", **kw)


def test_murmur2_is_kafkas_bit_for_bit():
    for length in range(0, 70):
        for _ in range(50):
            data = os.urandom(length)
            assert kafka.murmur2(data) == aiokafka_murmur2(data), data


def test_partition_for_is_where_producer_send_puts_a_key():
    partitions = list(range(12))
    for _ in range(2000):
        key = os.urandom(36)
        assert kafka.partition_for(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


def test_a_cached_token_is_refused_once_it_expires(monkeypatch):
    v = verifier()
    token = "Bearer " + issue(role="issuer", city="wuxi", ttl_s=60)
    first = v.verify(token)
    assert v.verify(token) is first, "the second use is served from the cache"
    with pytest.raises(Unauthorized):  # a verifier with other keys: not the cached entry
        verifier(OTHER_KEYS).verify(token)
    later = time.time() + 120
    monkeypatch.setattr(auth.time, "time", lambda: later)
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(token)
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(token)


def test_a_cached_token_is_refused_once_revoked_or_its_key_is_retired():
    v = verifier()
    token = "Bearer " + issue(role="admin", ttl_s=60, jti="revoke-me")
    kept = "Bearer " + issue(role="admin", ttl_s=60)
    v.verify(token), v.verify(kept)
    v.revoke("revoke-me", int(time.time()) + 60)
    with pytest.raises(Unauthorized, match="revoked"):
        v.verify(token)
    assert v.verify(kept).role == "admin"
    v.set_keys({})  # the key retired: what it signed verifies again, and fails
    with pytest.raises(Unauthorized, match="key"):
        v.verify(kept)


def test_the_token_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(auth, "TOKEN_CACHE_MAX", 3)
    v = verifier()
    for i in range(10):
        v.verify("Bearer " + issue(role="provider", provider=f"p{i}", ttl_s=60))
    assert len(v._verified) == 3


def test_refused_tokens_are_not_cached():
    v = verifier()
    token = issue(role="admin", ttl_s=60)
    tampered = token[:-10] + ("B" if token[-10] == "A" else "A") + token[-9:]  # a signature byte changed
    for bad in ("Bearer " + tampered, "Bearer x.y", None, "Basic abc"):
        with pytest.raises(Unauthorized):
            v.verify(bad)
    assert not v._verified


class _Conn:
    def __init__(self, log):
        self.log = log

    async def execute(self, sql, *args):
        self.log.append(("execute", sql, args))

    async def fetch(self, sql, *args):
        self.log.append(("fetch", sql, args))
        return [(event_id,) for event_id in args[0]]  # every id is fresh

    def transaction(self):
        return contextlib.nullcontext()


class _Pool:
    def __init__(self):
        self.log: list = []

    @contextlib.asynccontextmanager
    async def acquire(self):
        self.log.append(("acquire",))
        yield _Conn(self.log)


class _Record:
    def __init__(self, offset: int, value: bytes):
        self.topic, self.partition, self.offset, self.value = "t", 0, offset, value


def _settings() -> Settings:
    return Settings(service="issuing", port=0, pg_dsn="unused", kafka_bootstrap="unused", topic_issuing="t",
                    topic_redemption="t", group_prefix="g", run_dir=".")  # type: ignore[arg-type]


def _city(name: str) -> bytes:
    return outbox._encoder.encode(outbox.envelope(ev.CitySet, ev.CitySetData(city=name, name=name, currency="CNY"),
                                                  producer="issuing", actor="test"))


async def test_a_consumer_claims_only_what_it_wants():
    pool, handled = _Pool(), []

    async def handler(conn, delivered):
        handled.extend(d.offset for d in delivered)

    consumer = Consumer(_settings(), pool, topics=["t"], group="g", handler=handler,  # type: ignore[arg-type]
                        wants=lambda e: isinstance(e, ev.CitySet) and e.data.city == "wanted")
    # Nothing wanted in the batch: no transaction at all.
    await consumer._apply([_Record(0, _city("other")), _Record(1, _city("other"))])
    assert pool.log == [] and handled == []
    # A mixed batch: only the wanted event is claimed and handled.
    await consumer._apply([_Record(2, _city("other")), _Record(3, _city("wanted")), _Record(4, _city("other"))])
    claims = [entry for entry in pool.log if entry[0] == "fetch" and entry[1] == CLAIM_SQL]
    assert len(claims) == 1 and claims[0][2][3] == [3]
    assert handled == [3]
    # An undecodable message is still kept, wanted or not.
    pool.log.clear()
    await consumer._apply([_Record(5, b"not json")])
    assert [entry[0] for entry in pool.log] == ["acquire", "execute"]


async def test_the_default_consumer_wants_everything():
    pool, handled = _Pool(), []

    async def handler(conn, delivered):
        handled.extend(d.offset for d in delivered)

    consumer = Consumer(_settings(), pool, topics=["t"], group="g", handler=handler)  # type: ignore[arg-type]
    await consumer._apply([_Record(0, _city("a")), _Record(1, _city("b"))])
    assert handled == [0, 1]
    assert of_types(ev.CitySet)(outbox.envelope(ev.CitySet, ev.CitySetData(city="a", name="a", currency="CNY"),
                                                producer="issuing", actor="t"))


async def test_a_consumer_without_claims_hands_over_first_copies_and_writes_no_claim():
    pool, handled = _Pool(), []

    async def handler(conn, delivered):
        handled.extend(d.offset for d in delivered)

    consumer = Consumer(_settings(), pool, topics=["t"], group="g", handler=handler,  # type: ignore[arg-type]
                        claim=False)
    same = _city("a")
    await consumer._apply([_Record(0, same), _Record(1, same), _Record(2, _city("b"))])
    assert handled == [0, 2]
    assert not [entry for entry in pool.log if entry[0] == "fetch" and entry[1] == CLAIM_SQL]
