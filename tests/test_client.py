"""The typed client (clients/python, `cvl_client`) and the CLI built on it, against the real services: a provider's
story, an issuer's, an auditor's with every proof verified by the client's own RFC 9162 code; retries that reuse the
Idempotency-Key (a 429 from a process with a tiny rate limit, a connection dropped after the server did the work),
what is never retried, the errors named by problem code, and `cvl audit monitor` keeping its state."""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys

import pytest
from aiohttp import web

import cvl_client as cvl
from cvl_client import merkle
from services.ledger import notes
from tests.conftest import World, expires
from tests.harness import ROOT, eventually

BENEFICIARY = "91330100MA2XXXXX01"


def issuing(w: World) -> cvl.AsyncIssuingClient:
    return cvl.AsyncIssuingClient(w.issuing, w.issuer)


def provider(w: World, url: str | None = None, p: str | None = None, **kw) -> cvl.AsyncRedemptionClient:
    return cvl.AsyncRedemptionClient(url or w.redemption, w.provider_tokens[p or w.providers[0]], **kw)


async def minted(w: World, amount: int, **extra) -> str:
    async with issuing(w) as c:
        v = await c.mint(w.city, w.year, BENEFICIARY, amount, expires(), **extra)
    await ready(w, v.voucher_id)
    return v.voucher_id


async def ready(w: World, voucher_id: str) -> cvl.types.VoucherBalance:
    """Redeemable by the world's first provider: the mint and (a fresh world's) whitelist have both arrived."""
    async def check():
        async with provider(w) as p:
            try:
                return await p.wait_redeemable(voucher_id, timeout_s=30)
            except cvl.ProviderNotEligible:  # the ProviderSet event is still on its way
                return None
    return await eventually(check)


# --- the provider's story ---------------------------------------------------------------------------------------------

async def test_a_provider_redeems_holds_refunds_and_reads_its_statement_through_the_client(world_factory):
    w = await world_factory(10**9)
    async with issuing(w) as issuer:
        v = await issuer.mint(w.city, w.year, BENEFICIARY, 10_000, expires())
        assert isinstance(v, cvl.types.Voucher) and v.amount == 10_000 and v.status == "active"
    assert (await ready(w, v.voucher_id)).balance == 10_000
    async with provider(w) as p:
        r = await p.redeem(v.voucher_id, 1_200)
        assert r.balance == 8_800
        h = await p.place_hold(v.voucher_id, 3_000, timeout_s=600)
        assert h.status == "active"
        c = await p.capture_hold(h.hold_id, 2_000)
        assert (c.status, c.captured, c.released) == ("captured", 2_000, 1_000)
        h2 = await p.place_hold(v.voucher_id, 100, timeout_s=600)
        assert (await p.void_hold(h2.hold_id)).status == "voided"
        f = await p.refund(r.redemption_id, 200)
        assert (f.refunded, f.refundable, f.returned_to) == (200, 1_000, "voucher")
        assert (await p.voucher(v.voucher_id)).balance == 10_000 - 1_200 - 2_000 + 200
        s = await p.statement(w.providers[0])
        assert (s.totals.redeemed, s.totals.refunded, s.totals.net) == (3_200, 200, 3_000)
        listed = [x async for x in p.redemptions(voucher_id=v.voucher_id, limit=1)]
        assert [x.redemption_id for x in listed] == [r.redemption_id, c.redemption_id]


async def test_wait_redeemable_gives_up_with_not_found_after_its_timeout(world_factory):
    w = await world_factory(1000)
    async with provider(w) as p:
        started = asyncio.get_running_loop().time()
        with pytest.raises(cvl.NotFound) as caught:
            await p.wait_redeemable("00000000-0000-4000-8000-000000000000", timeout_s=0.5)
        assert 0.3 < asyncio.get_running_loop().time() - started < 3
        assert caught.value.status == 404 and caught.value.code == "not_found"


async def test_each_refusal_is_the_exception_its_problem_code_names(world_factory, stack):
    w = await world_factory(10_000, enterprise_cap=5_000)
    v = await minted(w, 1_000)
    async with provider(w) as p:
        with pytest.raises(cvl.InsufficientBalance):
            await p.redeem(v, 1_001)
        with pytest.raises(cvl.ValidationError) as caught:
            await p.redeem(v, 0)
        assert caught.value.field == "amount"
        h = await p.place_hold(v, 10, timeout_s=60)
        await p.void_hold(h.hold_id)
        with pytest.raises(cvl.HoldNotActive):
            await p.capture_hold(h.hold_id)
        key = cvl.new_idempotency_key()
        await p.redeem(v, 1, idempotency_key=key)
        with pytest.raises(cvl.IdempotencyKeyReused):
            await p.redeem(v, 2, idempotency_key=key)
    async with provider(w, p=w.providers[1]) as other:
        with pytest.raises(cvl.Forbidden):
            await other.capture_hold(h.hold_id)
    async with cvl.AsyncRedemptionClient(w.redemption, stack.token("provider", provider="stranger")) as stranger:
        with pytest.raises(cvl.ProviderNotEligible):
            await stranger.redeem(v, 1)
    async with cvl.AsyncRedemptionClient(w.redemption, "not-a-token") as nobody:
        with pytest.raises(cvl.Unauthorized):
            await nobody.voucher(v)
    async with issuing(w) as issuer:
        with pytest.raises(cvl.EnterpriseCapExceeded):
            await issuer.mint(w.city, w.year, BENEFICIARY, 4_500, expires())
        with pytest.raises(cvl.BudgetExceeded):
            await issuer.mint(w.city, w.year, "91330100MA2ZZZZZ03", 9_500, expires())
        ratio = await issuer.mint(w.city, w.year, "91330100MA2ZZZZZ04", 1_000, expires(), subsidy_ratio_bp=3000)
    await ready(w, ratio.voucher_id)
    async with provider(w) as p:
        with pytest.raises(cvl.SubsidyRatioExceeded):
            await p.redeem(ratio.voucher_id, 400, invoice_number="INV-1", invoice_amount=1_000)
        await p.redeem(ratio.voucher_id, 300, invoice_number="INV-1", invoice_amount=1_000)
        with pytest.raises(cvl.InvoiceAlreadySubsidised):
            await p.redeem(ratio.voucher_id, 1, invoice_number="INV-1", invoice_amount=1_000)
    async with issuing(w) as issuer:
        await issuer.revoke(v, "testing")

    async def revoked() -> bool:
        async with provider(w) as p:
            try:
                await p.redeem(v, 1)
            except cvl.VoucherRevoked:
                return True
        return False
    await eventually(revoked)
    async with cvl.AsyncIssuingClient(w.issuing, w.admin) as admin:
        with pytest.raises(cvl.ValidationError) as caught:
            await admin.vouchers_page()
        assert caught.value.field == "city"


# --- retries ----------------------------------------------------------------------------------------------------------

class Recorder:
    """httpx event hooks: every attempt's method, path and Idempotency-Key, and every answer's status."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        self.responses: list[tuple[int, str | None]] = []

    async def request(self, request) -> None:
        self.requests.append((request.method, request.url.path, request.headers.get("Idempotency-Key")))

    async def response(self, response) -> None:
        self.responses.append((response.status_code, response.headers.get("Idempotent-Replayed")))

    @property
    def hooks(self) -> dict:
        return {"event_hooks": {"request": [self.request], "response": [self.response]}}


async def test_a_429_is_retried_after_retry_after_with_the_same_idempotency_key(world_factory, stack):
    w = await world_factory(10**9)
    v = await minted(w, 10_000)
    limited = stack.start("redemption", extra_env={"CVL_RATE_LIMIT_PER_S": "1", "CVL_RATE_LIMIT_BURST": "1"})
    await stack.wait_ready(limited)
    try:
        seen = Recorder()
        async with provider(w, url=limited.url, **seen.hooks) as p:
            started = asyncio.get_running_loop().time()
            first = await p.redeem(v, 5)
            second = await p.redeem(v, 6)  # the bucket is empty: 429, Retry-After 1, then 201
            assert asyncio.get_running_loop().time() - started >= 0.5
        assert second.balance == first.balance - 6
        posts = [r for r in seen.requests if r[0] == "POST"]
        assert 429 in [s for s, _ in seen.responses]
        keys = [k for _, _, k in posts]
        assert len(posts) >= 3 and keys[0] != keys[1] and set(keys[1:]) == {keys[1]}
    finally:
        stack.kill(limited, 15)


class DroppingProxy:
    """A TCP proxy to `port` that lets the first request reach the server, then closes the client's connection
    instead of passing the answer on: the server did the work, the client saw a connection error."""

    def __init__(self, port: int):
        self.port, self.drops, self.server = port, 1, None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        drop, self.drops = self.drops > 0, max(0, self.drops - 1)

        async def pipe(src, dst, discard: bool) -> None:
            try:
                while data := await src.read(65536):
                    if discard:
                        break
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()
                up_writer.close()
        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, drop))

    async def close(self) -> None:
        self.server.close()


async def test_a_dropped_connection_is_retried_with_the_same_key_and_the_server_replays(world_factory):
    w = await world_factory(10**9)
    v = await minted(w, 10_000)
    proxy = DroppingProxy(int(w.redemption.rsplit(":", 1)[1]))
    url = await proxy.start()
    try:
        seen = Recorder()
        async with provider(w, url=url, **seen.hooks) as p:
            r = await p.redeem(v, 700)
        assert [m for m, _, _ in seen.requests] == ["POST", "POST"]
        assert seen.requests[0][2] == seen.requests[1][2]
        assert seen.responses == [(201, "true")]  # the first answer never arrived; the retry got it replayed
        async with provider(w) as p:
            assert (await p.voucher(v)).balance == 10_000 - 700 == r.balance  # redeemed once
    finally:
        await proxy.close()


async def test_only_429_503_and_connection_errors_are_retried_and_the_attempts_are_bounded():
    hits: list[tuple[str, str | None]] = []
    answers = {"/busy": (503, "0"), "/broken": (500, None), "/later": (429, "3600")}

    async def handler(request: web.Request) -> web.Response:
        hits.append((request.path, request.headers.get("Idempotency-Key")))
        status, retry_after = answers[request.path]
        code = {503: "unavailable", 500: "internal_error", 429: "rate_limited"}[status]
        return web.json_response({"type": "about:blank", "title": code, "status": status, "detail": code,
                                  "code": code}, status=status, content_type="application/problem+json",
                                 headers={"Retry-After": retry_after} if retry_after else None)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
    try:
        client = cvl.AsyncRedemptionClient(url, "t", attempts_max=3)
        with pytest.raises(cvl.Unavailable):
            await client._run(cvl.client._post("/busy", {}, None, None))  # noqa: SLF001
        assert len(hits) == 3 and len({k for _, k in hits}) == 1
        hits.clear()
        with pytest.raises(cvl.InternalError):
            await client._run(cvl.client._post("/broken", {}, None, None))  # noqa: SLF001
        assert len(hits) == 1
        hits.clear()
        with pytest.raises(cvl.RateLimited):  # Retry-After beyond RETRY_AFTER_MAX_S: not waited for
            await client._run(cvl.client._post("/later", {}, None, None))  # noqa: SLF001
        assert len(hits) == 1
        await client.aclose()
        nowhere = cvl.AsyncRedemptionClient("http://127.0.0.1:9", "t", attempts_max=2)
        with pytest.raises(cvl.TransportError):
            await nowhere.voucher("00000000-0000-4000-8000-000000000000")
        await nowhere.aclose()
    finally:
        await runner.cleanup()


# --- the auditor: proofs verified by the client ---------------------------------------------------------------------

def naive_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 MTH, straight from its definition."""
    if len(leaves) == 1:
        return merkle.leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(naive_root(leaves[:k]), naive_root(leaves[k:]))


def test_the_clients_proof_checks_accept_the_ledgers_proofs_and_refuse_altered_ones():
    from services.ledger import merkle as server  # the ledger's proof generator, as the oracle for the client's check
    leaves = [f"leaf {i}".encode() for i in range(33)]
    hashes = [merkle.leaf_hash(x) for x in leaves]
    get = {(0, i): h for i, h in enumerate(hashes)}

    def subtree(level: int, index: int) -> bytes:
        width = 2 ** level
        return naive_root(leaves[index * width:(index + 1) * width])
    for size in range(1, 34):
        root = naive_root(leaves[:size])
        for index in range(size):
            path = server.inclusion_proof(index, size, subtree)
            merkle.verify_inclusion(index, size, hashes[index], path, root)
            if path:
                with pytest.raises(cvl.ProofError):
                    merkle.verify_inclusion(index, size, hashes[index], [b"\x00" * 32] + path[1:], root)
        for first in range(1, size + 1):
            path = server.consistency_proof(first, size, subtree)
            merkle.verify_consistency(first, size, naive_root(leaves[:first]), root, path)
            if first < size:
                with pytest.raises(cvl.NotConsistent):
                    merkle.verify_consistency(first, size, hashlib.sha256(b"other").digest(), root, path)
    assert get


async def test_an_auditor_verifies_checkpoints_entries_and_balances_at_a_tree_size(world_factory):
    w = await world_factory(10**9)
    v = await minted(w, 5_000)
    async with provider(w) as p:
        await p.redeem(v, 1_234)
    account = f"voucher:{v}"
    async with cvl.AsyncLedgerClient(w.ledger, w.auditor) as ledger:
        key = (await ledger._run(cvl.client._Call("GET", "/v1/log/key", type_=str))).strip()  # noqa: SLF001

        async def covered():
            cp = await ledger.checkpoint(key)
            page = await ledger.account_entries_page(account)
            return (cp, page.entries) if len(page.entries) == 2 and all(
                e.index < cp.tree_size for e in page.entries) else None
        checkpoint, entries = await eventually(covered)
        for e in entries:
            await ledger.verify_entry(e, checkpoint)
        forged = entries[1].__class__(**{**{f: getattr(entries[1], f) for f in entries[1].__struct_fields__},
                                        "leaf": entries[0].leaf})
        with pytest.raises(cvl.ProofError):
            await ledger.verify_entry(forged, checkpoint)
        at = await ledger.account(account, tree_size=checkpoint.tree_size)
        assert (at.debits, at.credits, at.balance, at.tree_size) == (1_234, 5_000, 3_766, checkpoint.tree_size)
        oldest = (await ledger.checkpoints(0, 1))[0]
        first = cvl.note.open_checkpoint(oldest.note, cvl.note.parse_verifier_key(key))
        await ledger.verify_consistency(first, checkpoint)
        with pytest.raises(cvl.ProofError):
            await ledger.checkpoint(notes.LogKey.from_seed(first.origin, b"\x07" * 32).verifier())


# --- the CLI ----------------------------------------------------------------------------------------------------------

def cvl_cli(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"CVL_TOKEN": token} if token else {})}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


async def test_the_cli_mints_redeems_lists_and_prints_statements_for_each_role(world_factory):
    w = await world_factory(10**9)
    p = w.provider_tokens[w.providers[0]]
    out = await asyncio.to_thread(cvl_cli, "voucher", "mint", "--url", w.issuing, "--json", "--city", w.city,
                                  "--year", str(w.year), "--beneficiary", BENEFICIARY, "--amount", "9000",
                                  "--expires-at", expires(), token=w.issuer)
    assert out.returncode == 0, out.stderr
    voucher_id = json.loads(out.stdout)["voucher_id"]
    out = await asyncio.to_thread(cvl_cli, "redeem", voucher_id, "1500", "--url", w.redemption, "--wait-s", "30",
                                  "--token", p)
    assert out.returncode == 0, out.stderr
    assert "REDEMPTION_ID" in out.stdout and "7500" in out.stdout
    out = await asyncio.to_thread(cvl_cli, "redeem", voucher_id, "99999", "--url", w.redemption, "--token", p)
    assert out.returncode == 1 and "insufficient_balance" in out.stderr
    hold = await asyncio.to_thread(cvl_cli, "hold", "place", voucher_id, "100", "--url", w.redemption, "--json",
                                   token=p)
    hold_id = json.loads(hold.stdout)["hold_id"]
    cap = await asyncio.to_thread(cvl_cli, "hold", "capture", hold_id, "--url", w.redemption, "--json", token=p)
    assert json.loads(cap.stdout)["status"] == "captured"
    csv_out = await asyncio.to_thread(cvl_cli, "statement", w.providers[0], "--url", w.redemption, "--csv", token=p)
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0].startswith("kind,id,redemption_id") and len(lines) == 3
    listed = await asyncio.to_thread(cvl_cli, "voucher", "list", "--url", w.issuing, "--json", token=w.issuer)
    assert [json.loads(x)["voucher_id"] for x in listed.stdout.splitlines()] == [voucher_id]
    table = await asyncio.to_thread(cvl_cli, "voucher", "show", voucher_id, "--url", w.issuing, token=w.issuer)
    assert table.returncode == 0 and voucher_id in table.stdout and "BENEFICIARY" in table.stdout


async def test_audit_monitor_keeps_the_last_verified_checkpoint_and_fails_on_an_inconsistent_one(
        world_factory, tmp_path):
    w = await world_factory(10**9)
    await minted(w, 100)
    state = tmp_path / "monitor.json"
    async with cvl.AsyncLedgerClient(w.ledger, w.auditor) as ledger:
        key = (await ledger._run(cvl.client._Call("GET", "/v1/log/key", type_=str))).strip()  # noqa: SLF001
    first = await asyncio.to_thread(cvl_cli, "audit", "monitor", "--url", w.ledger, "--state", str(state), "--key",
                                    key, token=w.auditor)
    assert first.returncode == 0 and "first checkpoint recorded" in first.stdout, first.stdout + first.stderr
    size = json.loads(state.read_text())["tree_size"]
    await minted(w, 200)

    async def grew():
        out = await asyncio.to_thread(cvl_cli, "audit", "monitor", "--url", w.ledger, "--state", str(state),
                                      "--key", key, "--json", token=w.auditor)
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)["tree_size"] > size
    await eventually(grew)

    # A log that rewrote itself: a fake ledger signs size 2 with one root, then size 3 that does not extend it.
    log_key = notes.LogKey.from_seed("fake.example/log", b"\x05" * 32)
    leaves = [b"a", b"b", b"c"]
    current = {"note": log_key.sign(notes.checkpoint_body(log_key.name, 2, naive_root(leaves[:2])))}

    async def checkpoint(request):
        return web.Response(text=current["note"])

    async def consistency(request):
        return web.json_response({"first": 2, "second": 3, "path": ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]})
    app = web.Application()
    app.router.add_get("/v1/checkpoint", checkpoint)
    app.router.add_get("/v1/proofs/consistency", consistency)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
    fake_state = tmp_path / "fake.json"
    try:
        ok = await asyncio.to_thread(cvl_cli, "audit", "monitor", "--url", url, "--state", str(fake_state), "--key",
                                     log_key.verifier())
        assert ok.returncode == 0, ok.stdout + ok.stderr
        kept = fake_state.read_text()
        current["note"] = log_key.sign(notes.checkpoint_body(log_key.name, 3, naive_root([b"x", b"y", b"z"])))
        bad = await asyncio.to_thread(cvl_cli, "audit", "monitor", "--url", url, "--state", str(fake_state),
                                      "--key", log_key.verifier())
        assert bad.returncode == 1 and "not consistent" in bad.stdout, bad.stdout + bad.stderr
        assert fake_state.read_text() == kept  # the last verified checkpoint stays
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    finally:
        await runner.cleanup()
