"""Benchmark of `cvl audit verify --file` on a synthetic export of any size (no ledger needed).

    python -m services.audit.bench --entries 10000000 [--out .run/bench-export.jsonl] [--keep]

The export is written the way `cvl audit export` writes one (entries as the ledger serves them, totals, checkpoints
every CHECKPOINT_EVERY entries, trailer), by a tiny model of the ledger: budgets, mints, redemptions, holds (placed,
captured, voided), refunds, revocations and expiries with the postings the ledger documents, signed with a throwaway
Ed25519 key. With `programs`, each city also runs a second program (`model`) whose expired vouchers carry their unspent
value to the next year's budget of that program (then a BudgetCarried entry). Budget settings, mints, returns (a
BudgetReturned after each VoucherFrozen) and carries are budget steps (leaf v2). It then times the verification and prints
entries/s and seconds per million. This model is a benchmark fixture, not a reference: the tests check the verifier
against the real ledger.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import merkle, note
from .client import Progress
from .entries import Budget as LeafBudget  # the leaf v2 budget object, as the verifier reads it
from .export import EXPORT_FORMAT

CHECKPOINT_EVERY: Final = 10_000
ORIGIN: Final = "bench.cvl.example/ledger"
YEAR: Final = 2026
LEAF_PREFIX: Final = b"cvl-leaf-v1\n"
LEAF_V2_PREFIX: Final = b"cvl-leaf-v2\n"


class ServedPosting(msgspec.Struct):
    account: str
    debit: int
    credit: int


class ServedEntry(msgspec.Struct, omit_defaults=True):
    index: int
    event_id: str
    type: str
    occurred_at: dt.datetime
    postings: list[ServedPosting]
    leaf: str
    budget: LeafBudget | None = None


class LeafPosting(msgspec.Struct):
    account: str
    credit: int
    debit: int


class LeafBody(msgspec.Struct):
    event_id: str
    index: int
    occurred_at: str
    postings: list[LeafPosting]
    type: str


class LeafBodyV2(msgspec.Struct):
    budget: LeafBudget
    event_id: str
    index: int
    occurred_at: str
    postings: list[LeafPosting]
    type: str


class Signer:
    def __init__(self, name: str = ORIGIN):
        self.name = name
        self.private = Ed25519PrivateKey.generate()
        public = self.private.public_key().public_bytes_raw()
        self.key_id = note.key_id(name, public)
        self.verifier_key = f"{name}+{self.key_id.hex()}+{base64.b64encode(bytes([1]) + public).decode()}"

    def checkpoint(self, size: int, root: bytes) -> str:
        body = f"{self.name}\n{size}\n{base64.b64encode(root).decode()}\n"
        signature = self.private.sign(body.encode())
        return body + "\n\u2014 " + self.name + " " + base64.b64encode(self.key_id + signature).decode() + "\n"


CARRYING_PROGRAM: Final = "model"   # with `programs`: the second program of every city, whose expiries carry


def city_year(kind: str, city: str, program: str, year: int = YEAR) -> str:
    """A city-year account: the program is spelled out unless it is `default`."""
    return f"{kind}:{city}:{year}" if program == "default" else f"{kind}:{city}:{year}:{program}"


class Model:
    """Just enough of the ledger to make a realistic, valid log."""

    name_vouchers = True  # return and carry steps name their voucher (False: as leaves written before that)

    def __init__(self, seed: int, cities: int, programs: bool = False):
        self.rng = random.Random(seed)
        self.programs = programs
        self.cities = [f"city-{i}" for i in range(cities)]
        self.vouchers: list[tuple[str, str, int]] = []   # (voucher id, city, amount) minted, sampled for spending
        self.homes: dict[str, tuple[str, str]] = {}      # voucher id -> (city, program)
        self.balance: dict[str, int] = {}                # voucher id -> unspent
        self.holds: list[tuple[str, str, int]] = []      # (voucher id, provider, amount) open
        self.redemptions: list[tuple[str, str, int]] = []
        self.accounts: dict[str, list[int]] = {}         # account -> [debits, credits]
        self.reports: dict[tuple[str, int, str], dict[str, int]] = {}
        self.budgets: dict[tuple[str, str, int], list[int]] = {}  # (city, program, year) -> [seq, amount, committed]
        self.step: LeafBudget | None = None  # the budget step of the event just yielded
        self.time = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)

    def budget_step(self, city: str, program: str, year: int = YEAR, *, amount: int = 0, committed: int = 0,
                    **extra: int | str) -> None:
        """The next step of a budget: its amount and committed raised by these; set as `self.step` (a return or
        carry names its voucher unless `name_vouchers` is false, as leaves written before `voucher` was added)."""
        if not self.name_vouchers:
            extra.pop("voucher", None)
        b = self.budgets.setdefault((city, program, year), [0, 0, 0])
        b[0] += 1
        b[1] += amount
        b[2] += committed
        self.step = LeafBudget(amount=b[1], city=city, committed=b[2], program=program, seq=b[0], year=year, **extra)

    def report(self, city: str, program: str = "default", year: int = YEAR) -> dict[str, int]:
        return self.reports.setdefault((city, year, program), dict.fromkeys(
            ("budget", "issued", "redeemed", "refunded", "revoked", "expired", "outstanding", "available",
             "carried_in", "carried_out"), 0))

    def events(self):
        rng = self.rng
        programs = ["default", CARRYING_PROGRAM] if self.programs else ["default"]
        for city in self.cities:
            yield "CitySet", []
        for city in self.cities:
            for program in programs[1:]:
                yield "ProgramSet", []
        for city in self.cities:
            for program in programs:
                self.report(city, program)["budget"] += 10**15
                self.budget_step(city, program, amount=10**15)
                yield "BudgetSet", [(city_year("appropriation", city, program), 10**15, 0),
                                    (city_year("budget", city, program), 0, 10**15)]
        while True:
            r = rng.random()
            if r < 0.45 or len(self.vouchers) < 100:
                vid, city, amount = str(uuid.UUID(int=rng.getrandbits(128), version=4)), rng.choice(self.cities), \
                    rng.randint(100, 100_000)
                program = rng.choice(programs) if self.programs else "default"
                self.vouchers.append((vid, city, amount))
                self.homes[vid] = (city, program)
                self.balance[vid] = amount
                rep = self.report(city, program)
                rep["issued"] += amount
                rep["outstanding"] += amount
                self.budget_step(city, program, committed=amount)
                yield "VoucherMinted", [(city_year("budget", city, program), amount, 0), (f"voucher:{vid}", 0, amount)]
                continue
            vid, city, _ = self.vouchers[rng.randrange(max(0, len(self.vouchers) - 5000), len(self.vouchers))]
            program = self.homes[vid][1]
            left = self.balance[vid]
            provider = f"provider-{rng.randrange(8)}"
            rep = self.report(city, program)
            if r < 0.75 and left:
                amount = rng.randint(1, left)
                self.balance[vid] -= amount
                self.redemptions.append((vid, provider, amount))
                rep["redeemed"] += amount
                rep["outstanding"] -= amount
                yield "VoucherRedeemed", [(f"voucher:{vid}", amount, 0), (f"provider:{provider}", 0, amount)]
            elif r < 0.85 and left:
                amount = rng.randint(1, left)
                self.balance[vid] -= amount
                self.holds.append((vid, provider, amount))
                yield "HoldPlaced", [(f"voucher:{vid}", amount, 0), (f"hold:{vid}", 0, amount)]
            elif r < 0.93 and self.holds:
                hvid, hprov, held = self.holds.pop(rng.randrange(len(self.holds)))
                captured = rng.randint(0, held)
                released = held - captured
                self.balance[hvid] += released
                hrep = self.report(*self.homes[hvid])
                hrep["redeemed"] += captured
                hrep["outstanding"] -= captured
                postings = [(f"hold:{hvid}", held, 0)]
                if captured:
                    postings.append((f"provider:{hprov}", 0, captured))
                    self.redemptions.append((hvid, hprov, captured))
                if released:
                    postings.append((f"voucher:{hvid}", 0, released))
                yield "HoldCaptured", postings
            elif r < 0.96 and self.holds:
                hvid, _, held = self.holds.pop(rng.randrange(len(self.holds)))
                self.balance[hvid] += held
                yield "HoldVoided", [(f"hold:{hvid}", held, 0), (f"voucher:{hvid}", 0, held)]
            elif r < 0.98 and self.redemptions:
                rvid, rprov, amount = self.redemptions[rng.randrange(len(self.redemptions))]
                amount = rng.randint(1, amount)
                self.balance[rvid] += amount
                rrep = self.report(*self.homes[rvid])
                rrep["refunded"] += amount
                rrep["outstanding"] += amount
                yield "RedemptionRefunded", [(f"provider:{rprov}", amount, 0), (f"voucher:{rvid}", 0, amount)]
            elif left and not any(h[0] == vid for h in self.holds[-50:]):
                self.balance[vid] = 0
                if r < 0.99:
                    rep["revoked"] += left
                    rep["outstanding"] -= left
                    yield "VoucherFrozen", [(f"voucher:{vid}", left, 0), (city_year("budget", city, program), 0, left)]
                    self.budget_step(city, program, committed=-left, returned=left, voucher=vid)
                    yield "BudgetReturned", []
                elif program == CARRYING_PROGRAM:
                    rep["expired"] += left
                    rep["carried_out"] += left
                    rep["outstanding"] -= left
                    following = self.report(city, program, YEAR + 1)
                    following["budget"] += left
                    following["carried_in"] += left
                    yield "VoucherExpired", [(f"voucher:{vid}", left, 0),
                                             (city_year("budget", city, program, YEAR + 1), 0, left)]
                    self.budget_step(city, program, YEAR + 1, amount=left, carried=left, voucher=vid)
                    yield "BudgetCarried", []
                else:
                    rep["expired"] += left
                    rep["outstanding"] -= left
                    yield "VoucherExpired", [(f"voucher:{vid}", left, 0), (city_year("lapsed", city, program), 0, left)]
            else:
                yield "ProviderSet", []


def _totals(model: Model, size: int) -> dict:
    debits = sum(a[0] for a in model.accounts.values())
    reports = []
    for (city, year, program), r in sorted(model.reports.items()):
        d, c = model.accounts.get(city_year("budget", city, program, year), [0, 0])
        row = {"city": city, "year": year, **r, "available": c - d}
        if model.programs:
            row["program"] = program
        else:  # as a ledger of before programs served them
            del row["carried_in"], row["carried_out"]
        reports.append(row)
    accounts = [{"account": a, "debits": d, "credits": c, "balance": c - d}
                for a, (d, c) in sorted(model.accounts.items()) if not a.startswith(("voucher:", "hold:"))]
    return {"tree_size": size, "trial_balance": {"debits": debits, "credits": debits, "entries": size},
            "reports": reports, "accounts": accounts, "complete": True}


def write_synthetic_export(path: Path, entries: int, *, seed: int = 2026, cities: int = 5,
                           checkpoint_every: int = CHECKPOINT_EVERY, totals_at: int | None = None,
                           progress: Progress | None = None, programs: bool = False) -> str:
    """Write a valid export of `entries` entries to `path`, with the totals at `totals_at` (default: the end);
    returns the verifier key. `programs`: a second, carrying program per city (see the module docstring)."""
    totals_at = entries if totals_at is None else totals_at
    totals = _totals(Model(seed, cities, programs), 0) if totals_at == 0 else None
    signer = Signer()
    model = Model(seed, cities, programs)
    encode = msgspec.json.Encoder().encode
    frontier = merkle.Frontier()
    checkpoints: list[dict] = []
    with open(path, "wb", buffering=8 * 1024 * 1024) as f:
        f.write(encode({"format": EXPORT_FORMAT, "origin": ORIGIN, "key": signer.verifier_key,
                        "url": "synthetic", "exported_at": dt.datetime.now(dt.timezone.utc).isoformat()}) + b"\n")
        events = model.events()
        lines = []
        for index in range(entries):
            model.step = None
            type_, postings = next(events)
            step = model.step
            model.time += dt.timedelta(microseconds=model.rng.choice((0, 137, 250_000, 1)))
            t = model.time
            event_id = str(uuid.UUID(int=model.rng.getrandbits(128), version=4))
            ts = f"{t:%Y-%m-%dT%H:%M:%S}.{t.microsecond:06d}Z"
            leaf_postings = [LeafPosting(a, c, d) for a, d, c in postings]
            leaf = (LEAF_PREFIX + encode(LeafBody(event_id, index, ts, leaf_postings, type_)) if step is None
                    else LEAF_V2_PREFIX + encode(LeafBodyV2(step, event_id, index, ts, leaf_postings, type_)))
            for a, d, c in postings:
                acct = model.accounts.setdefault(a, [0, 0])
                acct[0] += d
                acct[1] += c
            lines.append(encode(ServedEntry(index, event_id, type_, t, [ServedPosting(*p) for p in postings],
                                            base64.b64encode(leaf).decode(), step)))
            frontier.append(hashlib.sha256(b"\x00" + leaf).digest())
            if frontier.size == totals_at:
                totals = _totals(model, totals_at)
            if frontier.size % checkpoint_every == 0 or frontier.size == entries:
                checkpoints.append({"tree_size": frontier.size, "note": signer.checkpoint(frontier.size,
                                                                                          frontier.root()),
                                    "signed_at": t.isoformat()})
            if len(lines) >= 10_000:
                f.write(b"\n".join(lines) + b"\n")
                lines.clear()
                if progress:
                    progress.update(index + 1, entries)
        if lines:
            f.write(b"\n".join(lines) + b"\n")
        f.write(encode({"totals": totals}) + b"\n")
        for cp in checkpoints:
            f.write(encode({"checkpoint": cp}) + b"\n")
        f.write(encode({"trailer": {"entries": entries, "checkpoints": len(checkpoints), "totals_at": totals_at}})
                + b"\n")
    return signer.verifier_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.audit.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--out", default=".run/bench-export.jsonl")
    parser.add_argument("--keep", action="store_true", help="keep the export file")
    args = parser.parse_args(argv)
    from .verify import VerificationFailed, verify_file

    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress("generate")
    started = time.monotonic()
    key = write_synthetic_export(path, args.entries, progress=progress)
    progress.close()
    size_mb = path.stat().st_size / 1e6
    print(f"synthetic export: {args.entries:,} entries, {size_mb:,.0f} MB, written in "
          f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    try:
        outcome = verify_file(path, note.parse_verifier_key(key), progress=Progress("verify"))
    except VerificationFailed as exc:
        print(f"FAILED: {exc}")
        return 1
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print(outcome.summary())
    per_million = outcome.seconds / args.entries * 1e6
    print(f"verify --file: {per_million:.2f} s per million entries ({args.entries / outcome.seconds:,.0f} "
          f"entries/s; {size_mb / outcome.seconds:,.0f} MB/s); 10 million entries ≈ {per_million * 10:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
