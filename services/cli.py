"""The `cvl` command line: tokens, demo data, and the auditor's export and verification of the ledger.

It joins the server's common package (tokens, settings) and the auditor's independent tool (`services.audit`), so it
lives outside both: `services.common` never imports the audit tool, and the audit tool imports nothing of the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from schemas.limits import AUDIT_TOKEN_TTL_S, CLI_HTTP_TIMEOUT_S, DEMO_TOKEN_TTL_S, TOKEN_TTL_S_MAX
from services.common import auth, settings

DEMO_YEAR: Final = 2026
DEMO_BUDGETS_FEN: Final = {
    "beijing-yizhuang": ("北京亦庄", 10_000_000_000),
    "shanghai": ("上海", 60_000_000_000),
    "wuhan": ("武汉", 1_000_000_000),
    "wuxi": ("无锡", 5_000_000_000),
    "qingyang": ("庆阳", 10_000_000_000),
}
# Programs besides each city's `default` (CONTRACT.md, "Programs"): (city, program) -> (program body, 2026 budget).
DEMO_PROGRAMS: Final = {
    ("beijing-yizhuang", "model"): ({"name": "模型券", "kind": "model"}, 10_000_000_000),
    ("wuhan", "sme"): ({"name": "中小企业算力券", "kind": "compute",
                       "eligible": {"sizes": ["micro", "small", "medium"]}}, 500_000_000),
}
DEMO_PROVIDERS: Final = {
    "aliyun": ("Alibaba Cloud", list(DEMO_BUDGETS_FEN)),
    "volcengine": ("Volcano Engine", list(DEMO_BUDGETS_FEN)),
    "sugon": ("Sugon", ["beijing-yizhuang", "qingyang", "wuxi"]),
    "ucloud": ("UCloud", ["shanghai", "wuhan"]),
}


def _token_key() -> bytes:
    return settings.token_key(settings.run_dir())


def cmd_token_issue(args: argparse.Namespace) -> int:
    ttl_s = auth.parse_ttl(args.ttl)
    if not 1 <= ttl_s <= TOKEN_TTL_S_MAX:
        print(f"--ttl must be between 1 s and {TOKEN_TTL_S_MAX} s", file=sys.stderr)
        return 2
    try:
        print(auth.issue(_token_key(), role=args.role, city=args.city, provider=args.provider, ttl_s=ttl_s))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _put(url: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=CLI_HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def cmd_demo_seed(args: argparse.Namespace) -> int:
    """Create the demo cities, programs, budgets and providers of CONTRACT.md (idempotent: PUTs of the same values
    change nothing) and write demo tokens."""
    key = _token_key()
    admin = auth.issue(key, role="admin", ttl_s=DEMO_TOKEN_TTL_S)
    base = args.url.rstrip("/")
    try:
        for city, (name, amount) in DEMO_BUDGETS_FEN.items():
            _put(f"{base}/v1/cities/{city}", admin, {"name": name, "currency": "CNY"})
            budget = _put(f"{base}/v1/cities/{city}/budgets/{DEMO_YEAR}", admin, {"amount": amount})
            print(f"budget {city} {DEMO_YEAR}: amount {budget['amount']} available {budget['available']}")
        for (city, program), (body, amount) in DEMO_PROGRAMS.items():
            _put(f"{base}/v1/cities/{city}/programs/{program}", admin, body)
            budget = _put(f"{base}/v1/cities/{city}/programs/{program}/budgets/{DEMO_YEAR}", admin, {"amount": amount})
            print(f"budget {city} {program} {DEMO_YEAR}: amount {budget['amount']} available {budget['available']}")
        for provider, (name, cities) in DEMO_PROVIDERS.items():
            _put(f"{base}/v1/providers/{provider}", admin, {"name": name, "cities": cities})
            print(f"provider {provider}: {', '.join(cities)}")
    except urllib.error.HTTPError as exc:
        print(f"seed failed: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    tokens = {
        "admin": admin,
        "auditor": auth.issue(key, role="auditor", ttl_s=DEMO_TOKEN_TTL_S),
        "issuer": {c: auth.issue(key, role="issuer", city=c, ttl_s=DEMO_TOKEN_TTL_S) for c in DEMO_BUDGETS_FEN},
        "provider": {p: auth.issue(key, role="provider", provider=p, ttl_s=DEMO_TOKEN_TTL_S) for p in DEMO_PROVIDERS},
    }
    out = settings.run_dir() / "tokens.json"
    out.write_text(json.dumps(tokens, indent=2))
    out.chmod(0o600)
    print(f"demo tokens written to {out}")
    return 0


# --- audit ------------------------------------------------------------------------------------------------------------

def _auditor_token(explicit: str | None) -> str | None:
    """--token, else $CVL_TOKEN, else a fresh auditor token signed with $CVL_TOKEN_KEY, else the demo auditor's
    token in .run/tokens.json, else one signed with .run/token.key (an operator on the ledger's own machine)."""
    if explicit:
        return explicit
    if env := os.environ.get("CVL_TOKEN"):
        return env
    if os.environ.get("CVL_TOKEN_KEY"):
        return auth.issue(_token_key(), role="auditor", ttl_s=AUDIT_TOKEN_TTL_S, sub="cvl-audit")
    run = settings.run_dir()
    tokens = run / "tokens.json"
    if tokens.exists():
        try:
            return json.loads(tokens.read_text())["auditor"]
        except (ValueError, KeyError):
            pass
    if (run / "token.key").exists():
        return auth.issue(_token_key(), role="auditor", ttl_s=AUDIT_TOKEN_TTL_S, sub="cvl-audit")
    return None


def _ledger_url() -> str:
    return f"http://127.0.0.1:{os.environ.get('CVL_LEDGER_PORT', settings.DEFAULT_PORTS['ledger'])}"


def cmd_audit_export(args: argparse.Namespace) -> int:
    from services.audit import client, export

    if args.out is None and sys.stdout.isatty():
        print("the export is large: give --out FILE, or redirect standard output", file=sys.stderr)
        return 2
    try:
        ledger = client.LedgerClient(args.url, _auditor_token(args.token))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    progress = client.Progress("export", enabled=not args.quiet)
    try:
        summary = export.export_to(ledger, Path(args.out) if args.out else None, progress=progress)
    except (client.ApiError, OSError) as exc:
        print(f"\nexport failed: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary.text(args.out or "standard output"), file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from services.audit import client, note, verify

    if args.file and not args.key:
        print("--file needs --key: the verifier key you trust (the key inside the export proves nothing)",
              file=sys.stderr)
        return 2
    try:
        ledger = None if args.file else client.LedgerClient(args.url, _auditor_token(args.token))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    progress = client.Progress("verify", enabled=not args.quiet)
    try:
        key = note.load_verifier_key(args.key) if args.key else None
        if ledger is None:
            outcome = verify.verify_file(Path(args.file), key, progress=progress)
        else:
            outcome = verify.verify_url(ledger, key, progress=progress)
    except note.NoteError as exc:
        progress.close()
        print(f"FAILED: the verifier key: {exc}")
        return 1
    except verify.VerificationFailed as exc:
        progress.close()
        print(f"FAILED: {exc}")
        return 1
    except (client.ApiError, OSError) as exc:
        progress.close()
        print(f"FAILED: could not read the log: {exc}")
        return 1
    progress.close()
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(outcome.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvl", description="Compute voucher ledger tools")
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="bearer tokens").add_subparsers(dest="action", required=True)
    issue = token.add_parser("issue", help="print a signed bearer token")
    issue.add_argument("--role", required=True, choices=auth.ROLES)
    issue.add_argument("--city", help="scope: the issuer's city, or an auditor's city")
    issue.add_argument("--provider", help="scope: the provider's id")
    issue.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    issue.set_defaults(func=cmd_token_issue)

    demo = sub.add_parser("demo", help="demo data").add_subparsers(dest="action", required=True)
    seed = demo.add_parser("seed", help="create the demo cities, budgets, providers and tokens")
    port = os.environ.get("CVL_ISSUING_PORT", settings.DEFAULT_PORTS["issuing"])
    seed.add_argument("--url", default=f"http://127.0.0.1:{port}", help="the issuing service")
    seed.set_defaults(func=cmd_demo_seed)

    audit = sub.add_parser("audit", help="export and verify the ledger's log").add_subparsers(dest="action",
                                                                                           required=True)
    token_help = "an unscoped auditor's bearer token (default: $CVL_TOKEN, else .run/tokens.json's auditor)"
    exp = audit.add_parser("export", help="write the log (entries, checkpoints, key, totals) as JSON Lines")
    exp.add_argument("--url", default=_ledger_url(), help="the ledger service (default %(default)s)")
    exp.add_argument("--out", help="the file to write (default: standard output)")
    exp.add_argument("--token", help=token_help)
    exp.add_argument("--quiet", action="store_true", help="no progress bar")
    exp.set_defaults(func=cmd_audit_export)
    ver = audit.add_parser("verify", help="recompute leaves, roots, signatures and balances; exit 0 when all hold")
    source = ver.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="verify the live ledger through its API")
    source.add_argument("--file", help="verify an export written by `cvl audit export`")
    ver.add_argument("--key", help="the verifier key (name+keyid+key), or a file holding it; required with --file; "
                                   "with --url, pins the key instead of trusting GET /v1/log/key")
    ver.add_argument("--token", help=token_help)
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=cmd_audit_verify)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
