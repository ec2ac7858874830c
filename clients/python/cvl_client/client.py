"""The clients: one per service (the URL you are given for it), each sync and async, with the same methods.

    RedemptionClient / AsyncRedemptionClient   providers (and auditors reading statements and redemptions)
    IssuingClient / AsyncIssuingClient         issuers (and admins listing vouchers)
    LedgerClient / AsyncLedgerClient           auditors: entries, accounts, proofs and checkpoints, verified

Every POST is sent with an Idempotency-Key, fresh for each logical call (or the one you pass, e.g. derived from your
invoice number, to stay safe across your own restarts) and the same on each of its retries, so a retry never does
the thing twice. Retried, at most ATTEMPTS_MAX times with exponential backoff and full jitter: 429 (after its
Retry-After), 503 (likewise), and connection errors; nothing else. A problem answer raises the exception its `code`
names (errors.py).

Each call is described once (a `_Call`); the sync and async classes differ only in how they send it.
"""
from __future__ import annotations

import asyncio
import base64
import datetime as dt
import random
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, NamedTuple

import httpx
import msgspec

from . import merkle, note
from . import types as t
from .errors import ApiError, NotConsistent, NotFound, ProofError, ProviderNotEligible, TransportError, from_problem
from .limits import (
    ATTEMPTS_MAX, BACKOFF_BASE_S, BACKOFF_MAX_S, PAGES_MAX, RETRY_AFTER_MAX_S, TIMEOUT_S, WAIT_POLL_MAX_S,
    WAIT_POLL_MIN_S,
)

RETRIED_STATUSES = frozenset({429, 503})
_encoder = msgspec.json.Encoder()
_decoders: dict[Any, msgspec.json.Decoder] = {}


class _Call(NamedTuple):
    method: str
    path: str
    params: dict[str, Any] | None = None
    body: Any = None                 # encoded as JSON; None: no body
    type_: Any = None                # the response's type; str: text; None: nothing
    idempotency_key: str | None = None


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def _params(**values: Any) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in values.items() if v is not None}


def _post(path: str, body: Any, type_: Any, key: str | None) -> _Call:
    return _Call("POST", path, None, body, type_, key or new_idempotency_key())


def _decode(type_: Any, raw: bytes) -> Any:
    if (decoder := _decoders.get(type_)) is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    return decoder.decode(raw)


def _problem(response: httpx.Response) -> ApiError:
    try:
        problem = msgspec.json.decode(response.content)
        if not isinstance(problem, dict):
            raise ValueError
    except (msgspec.DecodeError, ValueError):
        problem = {"detail": response.text[:500] or response.reason_phrase}
    problem.setdefault("request_id", response.headers.get("X-Request-Id"))
    return from_problem(response.status_code, problem)


def _result(call: _Call, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _problem(response)
    if call.type_ is None:
        return None
    if call.type_ is str:
        return response.text
    return _decode(call.type_, response.content)


def _pause_s(attempt: int, response: httpx.Response | None) -> float | None:
    """How long to wait before attempt `attempt + 1`, or None: do not retry. Full jitter on an exponential backoff;
    a Retry-After is honoured (plus jitter, so a crowd does not come back at once) unless it is longer than
    RETRY_AFTER_MAX_S."""
    backoff_s = random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt))
    if response is None:
        return backoff_s
    retry_after = response.headers.get("Retry-After")
    try:
        wait_s = float(retry_after) if retry_after is not None else 0.0
    except ValueError:
        wait_s = 0.0  # an HTTP-date: not sent by these services; back off instead
    if wait_s > RETRY_AFTER_MAX_S:
        return None
    return wait_s + backoff_s if wait_s else backoff_s


class _Settings:
    def __init__(self, url: str, token: str | None, *, timeout_s: float, attempts_max: int, **httpx_options: Any):
        if attempts_max < 1:
            raise ValueError("attempts_max must be at least 1")
        self.url = url.rstrip("/")
        self.attempts_max = attempts_max
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.options = {"base_url": self.url, "headers": headers, "timeout": timeout_s, **httpx_options}

    @staticmethod
    def request_args(call: _Call) -> dict[str, Any]:
        headers = {}
        content = None
        if call.body is not None:
            content = _encoder.encode(call.body)
            headers["Content-Type"] = "application/json"
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        return {"method": call.method, "url": call.path, "params": call.params, "content": content,
                "headers": headers}


def _give_up(call: _Call, response: httpx.Response | None, exc: Exception | None) -> Exception:
    if response is not None:
        return _problem(response)
    return TransportError(f"{call.method} {call.path}: {exc!r}")


# --- calls, described once --------------------------------------------------------------------------------------------

def _invoice(number: str | None, amount: int | None) -> dict | None:
    if (number is None) != (amount is None):
        raise ValueError("an invoice needs both its number and its amount")
    return None if number is None else {"number": number, "amount": amount}


class _RedemptionCalls:
    def _voucher(self, voucher_id: str) -> _Call:
        return _Call("GET", f"/v1/vouchers/{voucher_id}", type_=t.VoucherBalance)

    def _redeem(self, voucher_id, amount, invoice_number, invoice_amount, key) -> _Call:
        body: dict[str, Any] = {"voucher_id": voucher_id, "amount": amount}
        if (invoice := _invoice(invoice_number, invoice_amount)) is not None:
            body["invoice"] = invoice
        return _post("/v1/redemptions", body, t.Redemption, key)

    def _place_hold(self, voucher_id, amount, timeout_s, invoice_number, invoice_amount, key) -> _Call:
        body: dict[str, Any] = {"voucher_id": voucher_id, "amount": amount, "timeout_s": timeout_s}
        if (invoice := _invoice(invoice_number, invoice_amount)) is not None:
            body["invoice"] = invoice
        return _post("/v1/holds", body, t.Hold, key)

    def _capture(self, hold_id, amount, key) -> _Call:
        return _post(f"/v1/holds/{hold_id}/capture", {} if amount is None else {"amount": amount}, t.Hold, key)

    def _void(self, hold_id, key) -> _Call:
        return _post(f"/v1/holds/{hold_id}/void", {}, t.Hold, key)

    def _refund(self, redemption_id, amount, key) -> _Call:
        return _post(f"/v1/redemptions/{redemption_id}/refund", {"amount": amount}, t.Refund, key)

    def _statement(self, provider, start, end) -> _Call:
        return _Call("GET", f"/v1/providers/{provider}/statement", _params(**{"from": start, "to": end}),
                     type_=t.Statement)

    def _redemptions(self, voucher_id, start, end, cursor, limit) -> _Call:
        return _Call("GET", "/v1/redemptions", _params(voucher_id=voucher_id, cursor=cursor, limit=limit,
                                                       **{"from": start, "to": end}), type_=t.RedemptionPage)


class _IssuingCalls:
    def _mint(self, voucher: dict, key) -> _Call:
        return _post("/v1/vouchers", voucher, t.Voucher, key)

    def _mint_batch(self, vouchers: list[dict], key) -> _Call:
        return _post("/v1/vouchers/batch", {"vouchers": vouchers}, t.Vouchers, key)

    def _revoke(self, voucher_id, reason, key) -> _Call:
        return _post(f"/v1/vouchers/{voucher_id}/revoke", {"reason": reason}, t.Voucher, key)

    def _vouchers(self, city, year, beneficiary, status, cursor, limit) -> _Call:
        return _Call("GET", "/v1/vouchers", _params(city=city, year=year, beneficiary=beneficiary, status=status,
                                                    cursor=cursor, limit=limit), type_=t.VoucherPage)

    def _budget(self, city, year, program) -> _Call:
        path = (f"/v1/cities/{city}/budgets/{year}" if program in (None, "default")
                else f"/v1/cities/{city}/programs/{program}/budgets/{year}")
        return _Call("GET", path, type_=t.Budget)


def voucher_body(city: str, year: int, beneficiary: str, amount: int, expires_at: dt.datetime | str,
                 **extra: Any) -> dict:
    """One voucher to mint (extra: kind, subsidy_ratio_bp, providers, program, beneficiary_profile)."""
    at = expires_at.isoformat() if isinstance(expires_at, dt.datetime) else expires_at
    return {"city": city, "year": year, "beneficiary": beneficiary, "amount": amount, "expires_at": at,
            **{k: v for k, v in extra.items() if v is not None}}


def _b64d(text: str) -> bytes:
    return base64.b64decode(text)


class _LedgerCalls:
    def _account(self, name, tree_size) -> _Call:
        return _Call("GET", f"/v1/accounts/{name}", _params(tree_size=tree_size), type_=t.Account)

    def _account_entries(self, name, start, end, cursor, limit) -> _Call:
        return _Call("GET", f"/v1/accounts/{name}/entries",
                     _params(cursor=cursor, limit=limit, **{"from": start, "to": end}), type_=t.AccountEntries)

    def _entries(self, start, limit) -> _Call:
        return _Call("GET", "/v1/entries", _params(start=start, limit=limit), type_=t.Entries)

    def _inclusion(self, index, tree_size) -> _Call:
        return _Call("GET", "/v1/proofs/inclusion", _params(index=index, tree_size=tree_size), type_=t.InclusionProof)

    def _consistency(self, first, second) -> _Call:
        return _Call("GET", "/v1/proofs/consistency", _params(first=first, second=second), type_=t.ConsistencyProof)

    def _checkpoints(self, start, limit) -> _Call:
        return _Call("GET", "/v1/checkpoints", _params(start=start, limit=limit), type_=t.Checkpoints)

    def _report(self, city, year, program) -> _Call:
        return _Call("GET", f"/v1/reports/cities/{city}/{year}", _params(program=program), type_=t.CityReport)

    # Verifications, as steps: each yields the calls it needs and gets their results back (run by either client).

    @staticmethod
    def _checkpoint_steps(key: str | note.VerifierKey) -> Generator[_Call, Any, note.Checkpoint]:
        verifier = note.parse_verifier_key(key) if isinstance(key, str) else key
        text = yield _Call("GET", "/v1/checkpoint", type_=str)
        return note.open_checkpoint(text, verifier)

    @staticmethod
    def _entry_steps(entry: t.Entry, checkpoint: note.Checkpoint) -> Generator[_Call, Any, None]:
        if entry.index >= checkpoint.tree_size:
            raise ProofError(f"entry {entry.index} is beyond the checkpoint's tree size {checkpoint.tree_size}")
        proof: t.InclusionProof = yield _Call("GET", "/v1/proofs/inclusion",
                                              _params(index=entry.index, tree_size=checkpoint.tree_size),
                                              type_=t.InclusionProof)
        hashed = merkle.leaf_hash(entry.leaf_bytes)
        if _b64d(proof.leaf_hash) != hashed:
            raise ProofError(f"entry {entry.index}: the proof is for another leaf")
        merkle.verify_inclusion(entry.index, checkpoint.tree_size, hashed, [_b64d(p) for p in proof.path],
                                checkpoint.root)

    @staticmethod
    def _consistency_steps(old: note.Checkpoint, new: note.Checkpoint) -> Generator[_Call, Any, None]:
        if new.origin != old.origin:
            raise ProofError(f"the checkpoints are of different logs ({old.origin}, {new.origin})")
        if new.tree_size < old.tree_size:
            raise NotConsistent(f"the log shrank from {old.tree_size} to {new.tree_size} entries")
        if old.tree_size == 0 or old.tree_size == new.tree_size:
            merkle.verify_consistency(max(old.tree_size, 1), max(new.tree_size, 1), old.root, new.root, [])
            return
        proof: t.ConsistencyProof = yield _Call("GET", "/v1/proofs/consistency",
                                                _params(first=old.tree_size, second=new.tree_size),
                                                type_=t.ConsistencyProof)
        merkle.verify_consistency(old.tree_size, new.tree_size, old.root, new.root, [_b64d(p) for p in proof.path])


# --- the sync clients -------------------------------------------------------------------------------------------------

class _SyncClient:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = TIMEOUT_S,
                 attempts_max: int = ATTEMPTS_MAX, **httpx_options: Any):
        self._settings = _Settings(url, token, timeout_s=timeout_s, attempts_max=attempts_max, **httpx_options)
        self._http = httpx.Client(**self._settings.options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: _Call) -> Any:
        args = _Settings.request_args(call)
        for attempt in range(self._settings.attempts_max):
            response, error = None, None
            try:
                response = self._http.request(**args)
            except httpx.TransportError as exc:
                error = exc
            else:
                if response.status_code not in RETRIED_STATUSES:
                    return _result(call, response)
            pause_s = _pause_s(attempt, response)
            if pause_s is None or attempt + 1 == self._settings.attempts_max:
                raise _give_up(call, response, error) from error
            time.sleep(pause_s)
        raise AssertionError("unreachable")

    def _drive(self, steps: Generator[_Call, Any, Any]) -> Any:
        try:
            call = next(steps)
            while True:
                call = steps.send(self._run(call))
        except StopIteration as done:
            return done.value


class RedemptionClient(_SyncClient, _RedemptionCalls):
    """A provider's calls (and an auditor's statements and redemption lists) on the redemption service."""

    def voucher(self, voucher_id: str) -> t.VoucherBalance:
        return self._run(self._voucher(voucher_id))

    def wait_redeemable(self, voucher_id: str, timeout_s: float) -> t.VoucherBalance:
        """The voucher once the redemption service knows it and this provider may redeem it (a mint reaches it
        through Kafka, so a new voucher is 404 for a moment; a provider whitelisted for the city just now is 403
        provider_not_eligible until its ProviderSet has arrived too); the last of those errors after `timeout_s`."""
        deadline, pause_s = time.monotonic() + timeout_s, WAIT_POLL_MIN_S
        while True:
            try:
                return self.voucher(voucher_id)
            except (NotFound, ProviderNotEligible):
                if time.monotonic() + pause_s > deadline:
                    raise
            time.sleep(pause_s)
            pause_s = min(WAIT_POLL_MAX_S, pause_s * 2)

    def redeem(self, voucher_id: str, amount: int, *, invoice_number: str | None = None,
               invoice_amount: int | None = None, idempotency_key: str | None = None) -> t.Redemption:
        return self._run(self._redeem(voucher_id, amount, invoice_number, invoice_amount, idempotency_key))

    def place_hold(self, voucher_id: str, amount: int, timeout_s: int, *, invoice_number: str | None = None,
                   invoice_amount: int | None = None, idempotency_key: str | None = None) -> t.Hold:
        return self._run(self._place_hold(voucher_id, amount, timeout_s, invoice_number, invoice_amount,
                                          idempotency_key))

    def capture_hold(self, hold_id: str, amount: int | None = None, *,
                     idempotency_key: str | None = None) -> t.Hold:
        return self._run(self._capture(hold_id, amount, idempotency_key))

    def void_hold(self, hold_id: str, *, idempotency_key: str | None = None) -> t.Hold:
        return self._run(self._void(hold_id, idempotency_key))

    def refund(self, redemption_id: str, amount: int, *, idempotency_key: str | None = None) -> t.Refund:
        return self._run(self._refund(redemption_id, amount, idempotency_key))

    def statement(self, provider: str, start: dt.datetime | None = None,
                  end: dt.datetime | None = None) -> t.Statement:
        return self._run(self._statement(provider, start, end))

    def redemptions_page(self, *, voucher_id: str | None = None, start: dt.datetime | None = None,
                         end: dt.datetime | None = None, cursor: str | None = None,
                         limit: int | None = None) -> t.RedemptionPage:
        return self._run(self._redemptions(voucher_id, start, end, cursor, limit))

    def redemptions(self, *, voucher_id: str | None = None, start: dt.datetime | None = None,
                    end: dt.datetime | None = None, limit: int | None = None) -> Iterator[t.RedemptionDetail]:
        cursor = None
        for _ in range(PAGES_MAX):
            page = self.redemptions_page(voucher_id=voucher_id, start=start, end=end, cursor=cursor, limit=limit)
            yield from page.redemptions
            if (cursor := page.next_cursor) is None:
                return


class IssuingClient(_SyncClient, _IssuingCalls):
    """An issuer's calls (mint, batch, revoke, list) on the issuing service."""

    def mint(self, city: str, year: int, beneficiary: str, amount: int, expires_at: dt.datetime | str, *,
             idempotency_key: str | None = None, **extra: Any) -> t.Voucher:
        return self._run(self._mint(voucher_body(city, year, beneficiary, amount, expires_at, **extra),
                                    idempotency_key))

    def mint_batch(self, vouchers: list[dict], *, idempotency_key: str | None = None) -> list[t.Voucher]:
        """All or nothing; build each with `voucher_body`."""
        return self._run(self._mint_batch(vouchers, idempotency_key)).vouchers

    def revoke(self, voucher_id: str, reason: str, *, idempotency_key: str | None = None) -> t.Voucher:
        return self._run(self._revoke(voucher_id, reason, idempotency_key))

    def voucher(self, voucher_id: str) -> t.Voucher:
        return self._run(_Call("GET", f"/v1/vouchers/{voucher_id}", type_=t.Voucher))

    def budget(self, city: str, year: int, program: str | None = None) -> t.Budget:
        return self._run(self._budget(city, year, program))

    def vouchers_page(self, *, city: str | None = None, year: int | None = None, beneficiary: str | None = None,
                      status: str | None = None, cursor: str | None = None,
                      limit: int | None = None) -> t.VoucherPage:
        return self._run(self._vouchers(city, year, beneficiary, status, cursor, limit))

    def vouchers(self, *, city: str | None = None, year: int | None = None, beneficiary: str | None = None,
                 status: str | None = None, limit: int | None = None) -> Iterator[t.Voucher]:
        cursor = None
        for _ in range(PAGES_MAX):
            page = self.vouchers_page(city=city, year=year, beneficiary=beneficiary, status=status, cursor=cursor,
                                      limit=limit)
            yield from page.vouchers
            if (cursor := page.next_cursor) is None:
                return


class LedgerClient(_SyncClient, _LedgerCalls):
    """An auditor's calls on the ledger, with the proofs verified here (RFC 9162, C2SP signed notes)."""

    def account(self, name: str, *, tree_size: int | None = None) -> t.Account:
        return self._run(self._account(name, tree_size))

    def account_entries_page(self, name: str, *, start: dt.datetime | None = None, end: dt.datetime | None = None,
                             cursor: str | None = None, limit: int | None = None) -> t.AccountEntries:
        return self._run(self._account_entries(name, start, end, cursor, limit))

    def account_entries(self, name: str, *, start: dt.datetime | None = None, end: dt.datetime | None = None,
                        limit: int | None = None) -> Iterator[t.Entry]:
        cursor = None
        for _ in range(PAGES_MAX):
            page = self.account_entries_page(name, start=start, end=end, cursor=cursor, limit=limit)
            yield from page.entries
            if (cursor := page.next_cursor) is None:
                return

    def entries(self, start: int = 0, limit: int | None = None) -> list[t.Entry]:
        return self._run(self._entries(start, limit)).entries

    def report(self, city: str, year: int, program: str | None = None) -> t.CityReport:
        return self._run(self._report(city, year, program))

    def inclusion_proof(self, index: int, tree_size: int) -> t.InclusionProof:
        return self._run(self._inclusion(index, tree_size))

    def consistency_proof(self, first: int, second: int) -> t.ConsistencyProof:
        return self._run(self._consistency(first, second))

    def checkpoints(self, start: int = 0, limit: int | None = None) -> list[t.CheckpointView]:
        return self._run(self._checkpoints(start, limit)).checkpoints

    def log_key(self) -> str:
        """The key the ledger says it signs with: pin a copy obtained independently instead, where you can."""
        return self._run(_Call("GET", "/v1/log/key", type_=str)).strip()

    def checkpoint(self, key: str | note.VerifierKey) -> note.Checkpoint:
        """The latest checkpoint, its signature verified under `key` (ProofError otherwise)."""
        return self._drive(self._checkpoint_steps(key))

    def verify_entry(self, entry: t.Entry, checkpoint: note.Checkpoint) -> None:
        """Entry `entry` (its leaf bytes as served) is in the signed tree: ProofError otherwise."""
        self._drive(self._entry_steps(entry, checkpoint))

    def verify_consistency(self, old: note.Checkpoint, new: note.Checkpoint) -> None:
        """`new` extends `old`: NotConsistent otherwise."""
        self._drive(self._consistency_steps(old, new))


# --- the async clients ------------------------------------------------------------------------------------------------

class _AsyncClient:
    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = TIMEOUT_S,
                 attempts_max: int = ATTEMPTS_MAX, **httpx_options: Any):
        self._settings = _Settings(url, token, timeout_s=timeout_s, attempts_max=attempts_max, **httpx_options)
        self._http = httpx.AsyncClient(**self._settings.options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, call: _Call) -> Any:
        args = _Settings.request_args(call)
        for attempt in range(self._settings.attempts_max):
            response, error = None, None
            try:
                response = await self._http.request(**args)
            except httpx.TransportError as exc:
                error = exc
            else:
                if response.status_code not in RETRIED_STATUSES:
                    return _result(call, response)
            pause_s = _pause_s(attempt, response)
            if pause_s is None or attempt + 1 == self._settings.attempts_max:
                raise _give_up(call, response, error) from error
            await asyncio.sleep(pause_s)
        raise AssertionError("unreachable")

    async def _drive(self, steps: Generator[_Call, Any, Any]) -> Any:
        try:
            call = next(steps)
            while True:
                call = steps.send(await self._run(call))
        except StopIteration as done:
            return done.value


class AsyncRedemptionClient(_AsyncClient, _RedemptionCalls):
    """RedemptionClient's calls, awaited."""

    async def voucher(self, voucher_id: str) -> t.VoucherBalance:
        return await self._run(self._voucher(voucher_id))

    async def wait_redeemable(self, voucher_id: str, timeout_s: float) -> t.VoucherBalance:
        deadline, pause_s = time.monotonic() + timeout_s, WAIT_POLL_MIN_S
        while True:
            try:
                return await self.voucher(voucher_id)
            except (NotFound, ProviderNotEligible):
                if time.monotonic() + pause_s > deadline:
                    raise
            await asyncio.sleep(pause_s)
            pause_s = min(WAIT_POLL_MAX_S, pause_s * 2)

    async def redeem(self, voucher_id: str, amount: int, *, invoice_number: str | None = None,
                     invoice_amount: int | None = None, idempotency_key: str | None = None) -> t.Redemption:
        return await self._run(self._redeem(voucher_id, amount, invoice_number, invoice_amount, idempotency_key))

    async def place_hold(self, voucher_id: str, amount: int, timeout_s: int, *, invoice_number: str | None = None,
                         invoice_amount: int | None = None, idempotency_key: str | None = None) -> t.Hold:
        return await self._run(self._place_hold(voucher_id, amount, timeout_s, invoice_number, invoice_amount,
                                                idempotency_key))

    async def capture_hold(self, hold_id: str, amount: int | None = None, *,
                           idempotency_key: str | None = None) -> t.Hold:
        return await self._run(self._capture(hold_id, amount, idempotency_key))

    async def void_hold(self, hold_id: str, *, idempotency_key: str | None = None) -> t.Hold:
        return await self._run(self._void(hold_id, idempotency_key))

    async def refund(self, redemption_id: str, amount: int, *, idempotency_key: str | None = None) -> t.Refund:
        return await self._run(self._refund(redemption_id, amount, idempotency_key))

    async def statement(self, provider: str, start: dt.datetime | None = None,
                        end: dt.datetime | None = None) -> t.Statement:
        return await self._run(self._statement(provider, start, end))

    async def redemptions_page(self, *, voucher_id: str | None = None, start: dt.datetime | None = None,
                               end: dt.datetime | None = None, cursor: str | None = None,
                               limit: int | None = None) -> t.RedemptionPage:
        return await self._run(self._redemptions(voucher_id, start, end, cursor, limit))

    async def redemptions(self, *, voucher_id: str | None = None, start: dt.datetime | None = None,
                          end: dt.datetime | None = None,
                          limit: int | None = None) -> AsyncIterator[t.RedemptionDetail]:
        cursor = None
        for _ in range(PAGES_MAX):
            page = await self.redemptions_page(voucher_id=voucher_id, start=start, end=end, cursor=cursor,
                                               limit=limit)
            for r in page.redemptions:
                yield r
            if (cursor := page.next_cursor) is None:
                return


class AsyncIssuingClient(_AsyncClient, _IssuingCalls):
    """IssuingClient's calls, awaited."""

    async def mint(self, city: str, year: int, beneficiary: str, amount: int, expires_at: dt.datetime | str, *,
                   idempotency_key: str | None = None, **extra: Any) -> t.Voucher:
        return await self._run(self._mint(voucher_body(city, year, beneficiary, amount, expires_at, **extra),
                                          idempotency_key))

    async def mint_batch(self, vouchers: list[dict], *, idempotency_key: str | None = None) -> list[t.Voucher]:
        return (await self._run(self._mint_batch(vouchers, idempotency_key))).vouchers

    async def revoke(self, voucher_id: str, reason: str, *, idempotency_key: str | None = None) -> t.Voucher:
        return await self._run(self._revoke(voucher_id, reason, idempotency_key))

    async def voucher(self, voucher_id: str) -> t.Voucher:
        return await self._run(_Call("GET", f"/v1/vouchers/{voucher_id}", type_=t.Voucher))

    async def vouchers_page(self, *, city: str | None = None, year: int | None = None,
                            beneficiary: str | None = None, status: str | None = None, cursor: str | None = None,
                            limit: int | None = None) -> t.VoucherPage:
        return await self._run(self._vouchers(city, year, beneficiary, status, cursor, limit))


class AsyncLedgerClient(_AsyncClient, _LedgerCalls):
    """LedgerClient's calls, awaited."""

    async def account(self, name: str, *, tree_size: int | None = None) -> t.Account:
        return await self._run(self._account(name, tree_size))

    async def account_entries_page(self, name: str, *, start: dt.datetime | None = None,
                                   end: dt.datetime | None = None, cursor: str | None = None,
                                   limit: int | None = None) -> t.AccountEntries:
        return await self._run(self._account_entries(name, start, end, cursor, limit))

    async def entries(self, start: int = 0, limit: int | None = None) -> list[t.Entry]:
        return (await self._run(self._entries(start, limit))).entries

    async def inclusion_proof(self, index: int, tree_size: int) -> t.InclusionProof:
        return await self._run(self._inclusion(index, tree_size))

    async def consistency_proof(self, first: int, second: int) -> t.ConsistencyProof:
        return await self._run(self._consistency(first, second))

    async def checkpoints(self, start: int = 0, limit: int | None = None) -> list[t.CheckpointView]:
        return (await self._run(self._checkpoints(start, limit))).checkpoints

    async def checkpoint(self, key: str | note.VerifierKey) -> note.Checkpoint:
        return await self._drive(self._checkpoint_steps(key))

    async def verify_entry(self, entry: t.Entry, checkpoint: note.Checkpoint) -> None:
        await self._drive(self._entry_steps(entry, checkpoint))

    async def verify_consistency(self, old: note.Checkpoint, new: note.Checkpoint) -> None:
        await self._drive(self._consistency_steps(old, new))


__all__ = ["AsyncIssuingClient", "AsyncLedgerClient", "AsyncRedemptionClient", "IssuingClient", "LedgerClient",
           "RedemptionClient", "new_idempotency_key", "voucher_body"]
