"""Command-line calls for every role, on top of the client: `cvl` (the server's CLI) mounts them with `add_commands`
and `add_audit_commands`; alone, they are the `cvl-client` command this package installs.

    voucher mint|show|revoke|list    issuer (list: issuer, admin)        --url: the issuing service
    redeem, hold place|capture|void, refund, statement [--csv]   provider   --url: the redemption service
    audit monitor --state FILE --key KEY                          auditor   --url: the ledger

Each takes --url and --token (default $CVL_TOKEN) and --json (the service's JSON, one document per line) instead of
a table. Exit 0 on success, 1 when the service refused (the problem is printed) or the log is not consistent, 2 on
bad usage.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from . import client as c
from . import note
from .errors import CvlError, NotConsistent, ProofError

DEFAULT_PORTS = {"issuing": 8081, "redemption": 8082, "ledger": 8083}


def default_url(service: str) -> str:
    port = os.environ.get(f"CVL_{service.upper()}_PORT", str(DEFAULT_PORTS[service]))
    return f"http://127.0.0.1:{port}"


def _token(args: argparse.Namespace) -> str | None:
    return args.token or os.environ.get("CVL_TOKEN")


def _plain(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def _print_json(obj: Any) -> None:
    print(json.dumps(_plain(obj), ensure_ascii=False))


def table(rows: Sequence[dict], columns: Sequence[str], out=None) -> None:
    """A plain text table for humans: one header line, columns padded to their widest cell."""
    out = out or sys.stdout
    cells = [[("" if r.get(k) is None else str(r.get(k))) for k in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(columns)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        print("  ".join(v.rjust(w) if v.lstrip("-").isdigit() else v.ljust(w)
                        for v, w in zip(row, widths)).rstrip(), file=out)


def _show(args: argparse.Namespace, obj: Any, columns: Sequence[str]) -> None:
    if args.json:
        _print_json(obj)
    else:
        table([_plain(obj)], columns)


def _time(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError("give times with an offset, e.g. 2026-03-01T00:00:00+08:00")
    return at


# --- issuer -----------------------------------------------------------------------------------------------------------

VOUCHER_COLUMNS = ("voucher_id", "city", "year", "program", "beneficiary", "amount", "status", "expires_at")


def cmd_voucher_mint(args: argparse.Namespace) -> int:
    with c.IssuingClient(args.url, _token(args)) as cvl:
        v = cvl.mint(args.city, args.year, args.beneficiary, args.amount, args.expires_at, program=args.program,
                     subsidy_ratio_bp=args.subsidy_ratio_bp, providers=args.providers, kind=args.kind,
                     idempotency_key=args.idempotency_key)
    _show(args, v, VOUCHER_COLUMNS)
    return 0


def cmd_voucher_show(args: argparse.Namespace) -> int:
    if args.redeemable:
        with c.RedemptionClient(args.url, _token(args)) as cvl:
            _show(args, cvl.voucher(args.voucher_id),
                  ("voucher_id", "city", "amount", "balance", "held", "status", "expires_at"))
        return 0
    with c.IssuingClient(args.url, _token(args)) as cvl:
        _show(args, cvl.voucher(args.voucher_id), VOUCHER_COLUMNS + ("returned", "lapsed", "carried"))
    return 0


def cmd_voucher_revoke(args: argparse.Namespace) -> int:
    with c.IssuingClient(args.url, _token(args)) as cvl:
        _show(args, cvl.revoke(args.voucher_id, args.reason, idempotency_key=args.idempotency_key),
              VOUCHER_COLUMNS + ("revocation_pending",))
    return 0


def cmd_voucher_list(args: argparse.Namespace) -> int:
    with c.IssuingClient(args.url, _token(args)) as cvl:
        rows = cvl.vouchers(city=args.city, year=args.year, beneficiary=args.beneficiary, status=args.status,
                            limit=args.page_size)
        return _emit_rows(args, rows, VOUCHER_COLUMNS, args.max)


def _emit_rows(args: argparse.Namespace, rows, columns: Sequence[str], most: int) -> int:
    taken = []
    for n, row in enumerate(rows):
        if n >= most:
            print(f"(stopped after --max {most})", file=sys.stderr)
            break
        if args.json:
            _print_json(row)
        else:
            taken.append(_plain(row))
    if not args.json:
        table(taken, columns)
    return 0


# --- provider ---------------------------------------------------------------------------------------------------------

def cmd_redeem(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        if args.wait_s:
            cvl.wait_redeemable(args.voucher_id, args.wait_s)
        r = cvl.redeem(args.voucher_id, args.amount, invoice_number=args.invoice_number,
                       invoice_amount=args.invoice_amount, idempotency_key=args.idempotency_key)
    _show(args, r, ("redemption_id", "voucher_id", "provider", "amount", "balance"))
    return 0


HOLD_COLUMNS = ("hold_id", "voucher_id", "amount", "status", "captured", "released", "redemption_id", "expires_at")


def cmd_hold_place(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        h = cvl.place_hold(args.voucher_id, args.amount, args.timeout_s, invoice_number=args.invoice_number,
                           invoice_amount=args.invoice_amount, idempotency_key=args.idempotency_key)
    _show(args, h, HOLD_COLUMNS)
    return 0


def cmd_hold_capture(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        _show(args, cvl.capture_hold(args.hold_id, args.amount, idempotency_key=args.idempotency_key), HOLD_COLUMNS)
    return 0


def cmd_hold_void(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        _show(args, cvl.void_hold(args.hold_id, idempotency_key=args.idempotency_key), HOLD_COLUMNS)
    return 0


def cmd_refund(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        _show(args, cvl.refund(args.redemption_id, args.amount, idempotency_key=args.idempotency_key),
              ("refund_id", "redemption_id", "amount", "refunded", "refundable", "returned_to"))
    return 0


STATEMENT_COLUMNS = ("kind", "id", "redemption_id", "voucher_id", "city", "year", "amount", "created_at")


def cmd_statement(args: argparse.Namespace) -> int:
    with c.RedemptionClient(args.url, _token(args)) as cvl:
        s = cvl.statement(args.provider, _time(args.start), _time(args.end))
    if args.json:
        _print_json(s)
        return 0
    lines = ([{"kind": "redemption", "id": r.redemption_id, **_plain(r)} for r in s.redemptions]
             + [{"kind": "refund", "id": r.refund_id, **_plain(r)} for r in s.refunds])
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=STATEMENT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(lines)
        return 0
    table(lines, STATEMENT_COLUMNS)
    t = s.totals
    print(f"\n{t.redemptions} redemptions {t.redeemed}, {t.refunds} refunds {t.refunded}, net {t.net} (fen)"
          + ("; TRUNCATED: ask again from the last line's created_at" if s.truncated else ""))
    return 0


# --- auditor: the monitor ---------------------------------------------------------------------------------------------

class MonitorState(msgspec.Struct, kw_only=True):
    """The last checkpoint the monitor verified (kept in --state)."""
    origin: str
    tree_size: int
    root: str   # base64
    note: str
    verified_at: str


def _write_atomically(path: Path, data: bytes) -> None:
    """The new state replaces the old whole or not at all: a temporary file beside it, flushed, then renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def cmd_audit_monitor(args: argparse.Namespace) -> int:
    import base64

    state_path = Path(args.state)
    try:
        key = note.parse_verifier_key(Path(args.key).read_text() if Path(args.key).is_file() else args.key)
    except ProofError as exc:
        print(f"FAILED: the verifier key: {exc}")
        return 2
    old = None
    if state_path.exists():
        state = msgspec.json.decode(state_path.read_bytes(), type=MonitorState)
        try:
            old = note.open_checkpoint(state.note, key)  # the stored note must still verify under the key
        except ProofError as exc:
            print(f"FAILED: the state file's checkpoint: {exc}")
            return 1
    with c.LedgerClient(args.url, _token(args)) as cvl:
        try:
            new = cvl.checkpoint(key)
            if old is not None:
                cvl.verify_consistency(old, new)
        except NotConsistent as exc:
            print(f"FAILED: not consistent with the checkpoint of size {old.tree_size if old else 0} in "
                  f"{state_path}: {exc}")
            return 1
        except ProofError as exc:
            print(f"FAILED: {exc}")
            return 1
    state = MonitorState(origin=new.origin, tree_size=new.tree_size, root=base64.b64encode(new.root).decode(),
                         note=new.note, verified_at=dt.datetime.now(dt.timezone.utc).isoformat())
    _write_atomically(state_path, msgspec.json.encode(state))
    if args.json:
        _print_json({"origin": new.origin, "tree_size": new.tree_size, "previous_tree_size":
                     old.tree_size if old else None, "consistent": True})
    elif old is None:
        print(f"OK: first checkpoint recorded: {new.origin} size {new.tree_size}")
    else:
        print(f"OK: {new.origin} grew from {old.tree_size} to {new.tree_size} entries, consistently")
    return 0


# --- wiring -----------------------------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser, service: str, *, post: bool = False) -> None:
    p.add_argument("--url", default=default_url(service), help=f"the {service} service (default %(default)s)")
    p.add_argument("--token", help="bearer token (default: $CVL_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the service's JSON instead of a table")
    if post:
        p.add_argument("--idempotency-key", help="reuse a key of your own (default: a fresh one per call, reused "
                                                 "across its retries)")


def _invoice_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--invoice-number")
    p.add_argument("--invoice-amount", type=int)


def add_commands(sub: Any) -> None:
    voucher = sub.add_parser("voucher", help="vouchers (issuer)").add_subparsers(dest="action", required=True)
    mint = voucher.add_parser("mint", help="mint a voucher within the budget")
    _common(mint, "issuing", post=True)
    mint.add_argument("--city", required=True)
    mint.add_argument("--year", type=int, required=True)
    mint.add_argument("--beneficiary", required=True)
    mint.add_argument("--amount", type=int, required=True, help="fen")
    mint.add_argument("--expires-at", required=True, help="RFC 3339 with offset")
    mint.add_argument("--program")
    mint.add_argument("--kind", choices=("compute", "model"))
    mint.add_argument("--subsidy-ratio-bp", type=int)
    mint.add_argument("--provider", dest="providers", action="append", help="limit to these providers")
    mint.set_defaults(func=_guarded(cmd_voucher_mint))
    show = voucher.add_parser("show", help="a voucher (issuing; --redeemable: its balance on the redemption side)")
    _common(show, "issuing")
    show.add_argument("voucher_id")
    show.add_argument("--redeemable", action="store_true",
                      help="ask the redemption service (--url of it) for balance and held, as a provider sees it")
    show.set_defaults(func=_guarded(cmd_voucher_show))
    revoke = voucher.add_parser("revoke", help="revoke a voucher: its unspent balance returns to the budget")
    _common(revoke, "issuing", post=True)
    revoke.add_argument("voucher_id")
    revoke.add_argument("--reason", required=True)
    revoke.set_defaults(func=_guarded(cmd_voucher_revoke))
    lst = voucher.add_parser("list", help="a city's vouchers, oldest first (every page)")
    _common(lst, "issuing")
    lst.add_argument("--city", help="default: the issuer token's city (an admin must give it)")
    lst.add_argument("--year", type=int)
    lst.add_argument("--beneficiary")
    lst.add_argument("--status", choices=("active", "revoked", "expired"))
    lst.add_argument("--page-size", type=int, default=None)
    lst.add_argument("--max", type=int, default=10_000, help="stop after this many (default %(default)s)")
    lst.set_defaults(func=_guarded(cmd_voucher_list))

    redeem = sub.add_parser("redeem", help="redeem part of a voucher now (provider)")
    _common(redeem, "redemption", post=True)
    redeem.add_argument("voucher_id")
    redeem.add_argument("amount", type=int, help="fen")
    _invoice_args(redeem)
    redeem.add_argument("--wait-s", type=float, default=0.0,
                        help="first wait up to this long for a new voucher to become redeemable")
    redeem.set_defaults(func=_guarded(cmd_redeem))

    hold = sub.add_parser("hold", help="holds (provider)").add_subparsers(dest="action", required=True)
    place = hold.add_parser("place", help="reserve part of a voucher")
    _common(place, "redemption", post=True)
    place.add_argument("voucher_id")
    place.add_argument("amount", type=int)
    place.add_argument("--timeout-s", type=int, default=3600)
    _invoice_args(place)
    place.set_defaults(func=_guarded(cmd_hold_place))
    cap = hold.add_parser("capture", help="capture up to the held amount (all by default)")
    _common(cap, "redemption", post=True)
    cap.add_argument("hold_id")
    cap.add_argument("--amount", type=int)
    cap.set_defaults(func=_guarded(cmd_hold_capture))
    void = hold.add_parser("void", help="release a hold")
    _common(void, "redemption", post=True)
    void.add_argument("hold_id")
    void.set_defaults(func=_guarded(cmd_hold_void))

    refund = sub.add_parser("refund", help="return part of a redemption to its voucher (provider)")
    _common(refund, "redemption", post=True)
    refund.add_argument("redemption_id")
    refund.add_argument("amount", type=int)
    refund.set_defaults(func=_guarded(cmd_refund))

    st = sub.add_parser("statement", help="a provider's redemptions and refunds with totals (provider, auditor)")
    _common(st, "redemption")
    st.add_argument("provider")
    st.add_argument("--from", dest="start", help="RFC 3339, inclusive")
    st.add_argument("--to", dest="end", help="RFC 3339, exclusive")
    st.add_argument("--csv", action="store_true", help="the lines as CSV")
    st.set_defaults(func=_guarded(cmd_statement))


def add_audit_commands(audit: Any) -> None:
    mon = audit.add_parser("monitor", help="verify the latest checkpoint against the one kept in --state: its "
                                           "signature and a consistency proof; exit 1 if not consistent")
    _common(mon, "ledger")
    mon.add_argument("--state", required=True, help="the file that keeps the last verified checkpoint")
    mon.add_argument("--key", required=True, help="the log's verifier key (or a file holding it), pinned")
    mon.set_defaults(func=_guarded(cmd_audit_monitor))


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose client errors (a problem, a failed connection, a proof) are a message and exit 1."""
    def command(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CvlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (ValueError, argparse.ArgumentTypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    command.__name__ = func.__name__
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvl-client", description="Compute voucher ledger calls for every role")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    audit = sub.add_parser("audit", help="the ledger's log").add_subparsers(dest="action", required=True)
    add_audit_commands(audit)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
