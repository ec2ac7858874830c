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
from services.common import auth, jwks, settings

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


def _signing_keys() -> jwks.SigningKeys:
    """The private signing keys: $CVL_TOKEN_SIGNING_KEY, else .run/token-signing.jwk (created on first use, with the
    public .run/token-jwks.json the services read)."""
    return jwks.signing_keys(settings.run_dir())


def _issue(keys: jwks.SigningKeys, role: str, *, ttl_s: int, city: str | None = None, provider: str | None = None,
           sub: str | None = None) -> str:
    return auth.issue(keys, role=role, city=city, provider=provider, ttl_s=ttl_s, sub=sub,  # type: ignore[arg-type]
                      issuer=settings.token_issuer(), audience=settings.token_audience())


def cmd_token_issue(args: argparse.Namespace) -> int:
    ttl_s = auth.parse_ttl(args.ttl)
    if not 1 <= ttl_s <= TOKEN_TTL_S_MAX:
        print(f"--ttl must be between 1 s and {TOKEN_TTL_S_MAX} s", file=sys.stderr)
        return 2
    try:
        print(_issue(_signing_keys(), args.role, city=args.city, provider=args.provider, ttl_s=ttl_s, sub=args.sub))
    except ValueError as exc:  # jwks.KeySetError included
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def _print_keys(keys: jwks.SigningKeys) -> None:
    for key in keys.keys:
        print(f"{key['kid']}{'  (signs)' if key is keys.current else ''}")


def cmd_token_init(args: argparse.Namespace) -> int:
    """Create the signing key set if there is none and (re)write the public JWK Set the services read."""
    try:
        keys = _signing_keys()
    except jwks.KeySetError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    jwks.write_public(settings.run_dir() / jwks.PUBLIC_FILE, keys)  # also for keys from $CVL_TOKEN_SIGNING_KEY
    _print_keys(keys)
    return 0


def cmd_token_rotate_key(args: argparse.Namespace) -> int:
    try:
        kid = jwks.rotate(settings.run_dir())
    except jwks.KeySetError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(kid)
    return 0


def cmd_token_retire_key(args: argparse.Namespace) -> int:
    try:
        jwks.retire(settings.run_dir(), args.kid)
    except jwks.KeySetError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"retired {args.kid}: the services refuse its tokens once they re-read the key set (within seconds)")
    return 0


def _put(url: str, token: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=CLI_HTTP_TIMEOUT_S) as response:
        return json.loads(response.read())


def cmd_demo_seed(args: argparse.Namespace) -> int:
    """Create the demo cities, programs, budgets and providers of CONTRACT.md (idempotent: PUTs of the same values
    change nothing) and write demo tokens."""
    keys = _signing_keys()
    admin = _issue(keys, "admin", ttl_s=DEMO_TOKEN_TTL_S)
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
        "auditor": _issue(keys, "auditor", ttl_s=DEMO_TOKEN_TTL_S),
        "issuer": {c: _issue(keys, "issuer", city=c, ttl_s=DEMO_TOKEN_TTL_S) for c in DEMO_BUDGETS_FEN},
        "provider": {p: _issue(keys, "provider", provider=p, ttl_s=DEMO_TOKEN_TTL_S) for p in DEMO_PROVIDERS},
    }
    out = settings.run_dir() / "tokens.json"
    out.write_text(json.dumps(tokens, indent=2))
    out.chmod(0o600)
    print(f"demo tokens written to {out}")
    return 0


# --- audit ------------------------------------------------------------------------------------------------------------

def _auditor_token(explicit: str | None) -> str | None:
    """--token, else $CVL_TOKEN, else a fresh auditor token signed with $CVL_TOKEN_SIGNING_KEY, else the demo
    auditor's token in .run/tokens.json, else one signed with .run/token-signing.jwk (an operator on the machine
    that holds the signing key)."""
    if explicit:
        return explicit
    if env := os.environ.get("CVL_TOKEN"):
        return env
    if os.environ.get(jwks.SIGNING_ENV):
        return _issue(_signing_keys(), "auditor", ttl_s=AUDIT_TOKEN_TTL_S, sub="cvl-audit")
    run = settings.run_dir()
    tokens = run / "tokens.json"
    if tokens.exists():
        try:
            return json.loads(tokens.read_text())["auditor"]
        except (ValueError, KeyError):
            pass
    if (run / jwks.SIGNING_FILE).exists():
        return _issue(_signing_keys(), "auditor", ttl_s=AUDIT_TOKEN_TTL_S, sub="cvl-audit")
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
    if args.quorum is not None and not 1 <= args.quorum <= len(args.witness or ()):
        print(f"--quorum {args.quorum}: must be 1 to the number of --witness keys given ({len(args.witness or ())})",
              file=sys.stderr)
        return 2
    progress = client.Progress("verify", enabled=not args.quiet)
    try:
        key = note.load_verifier_key(args.key) if args.key else None
        witnesses = [note.load_witness_key(w) for w in args.witness or ()]
        if ledger is None:
            outcome = verify.verify_file(Path(args.file), key, progress=progress, witnesses=witnesses,
                                         quorum=args.quorum)
        else:
            outcome = verify.verify_url(ledger, key, progress=progress, witnesses=witnesses, quorum=args.quorum)
    except note.NoteError as exc:
        progress.close()
        print(f"FAILED: a verifier or witness key: {exc}")
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


# --- witness ----------------------------------------------------------------------------------------------------------

def cmd_witness_serve(args: argparse.Namespace) -> int:
    from services.common import logs
    from services.witness import config, server

    logs.setup("witness")
    try:
        cfg = config.from_env(log_keys=args.log_key, port=args.port, name=args.name, state=args.state)
        server.serve(cfg)
    except (ValueError, server.StateError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


def cmd_witness_key(args: argparse.Namespace) -> int:
    from services.witness import config, cosigner

    try:
        key = cosigner.load_key(settings.run_dir(), args.name or config.name_from_env())
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(key.verifier())
    return 0


def _client_commands(sub, audit) -> None:
    """The calls of every role (voucher, redeem, hold, refund, statement, audit monitor) come from the client package
    (clients/python, installed by `make venv`): the CLI is their one implementation, on top of cvl_client. Without
    the package, they say how to get it."""
    try:
        from cvl_client import cli as client_cli
    except ImportError:
        def missing(args: argparse.Namespace) -> int:
            print("this command needs the client package: pip install ./clients/python", file=sys.stderr)
            return 2
        for name in ("voucher", "redeem", "hold", "refund", "statement"):
            sub.add_parser(name, help="needs ./clients/python").set_defaults(func=missing)
        audit.add_parser("monitor", help="needs ./clients/python").set_defaults(func=missing)
        return
    client_cli.add_commands(sub)
    client_cli.add_audit_commands(audit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cvl", description="Compute voucher ledger tools")
    sub = parser.add_subparsers(dest="command", required=True)

    token = sub.add_parser("token", help="bearer tokens").add_subparsers(dest="action", required=True)
    issue = token.add_parser("issue", help="print a signed bearer token")
    issue.add_argument("--role", required=True, choices=auth.ROLES)
    issue.add_argument("--city", help="scope: the issuer's city, or an auditor's city")
    issue.add_argument("--provider", help="scope: the provider's id")
    issue.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    issue.add_argument("--sub", help="the subject (default: the role)")
    issue.set_defaults(func=cmd_token_issue)
    init = token.add_parser("init", help="create the signing key set if missing; write the public JWK Set")
    init.set_defaults(func=cmd_token_init)
    rotate = token.add_parser("rotate-key", help="add a signing key that signs from now on (old keys still verify)")
    rotate.set_defaults(func=cmd_token_rotate_key)
    retire = token.add_parser("retire-key", help="remove a key that no longer signs: its tokens are refused")
    retire.add_argument("kid")
    retire.set_defaults(func=cmd_token_retire_key)

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
    ver.add_argument("--witness", action="append", metavar="KEY",
                     help="a witness's verifier key (name+keyid+base64(0x04 || key)), or a file holding it; "
                          "repeatable: the latest checkpoint must carry their cosignatures")
    ver.add_argument("--quorum", type=int, metavar="N",
                     help="how many of the --witness keys must have cosigned (default: all of them)")
    ver.add_argument("--token", help=token_help)
    ver.add_argument("--quiet", action="store_true", help="no progress bar")
    ver.set_defaults(func=cmd_audit_verify)

    witness = sub.add_parser("witness", help="our C2SP tlog-witness").add_subparsers(dest="action", required=True)
    serve = witness.add_parser("serve", help="run the witness: cosign checkpoints consistent with what it saw")
    serve.add_argument("--log-key", action="append", metavar="KEY",
                       help="the verifier key of a log it witnesses (its name is the log's origin), or a file "
                            "holding it; repeatable (default: $CVL_WITNESS_LOG_KEYS, comma-separated)")
    serve.add_argument("--port", type=int, help="default $CVL_WITNESS_PORT, else 8084 (listens on 127.0.0.1)")
    serve.add_argument("--name", help="the witness's key name (default $CVL_WITNESS_NAME, else cvl.example/witness)")
    serve.add_argument("--state", help="its state file (default $CVL_WITNESS_STATE, else .run/witness-state.json)")
    serve.set_defaults(func=cmd_witness_serve)
    wkey = witness.add_parser("key", help="print the witness's verifier key (creating its key once)")
    wkey.add_argument("--name", help="the witness's key name (default $CVL_WITNESS_NAME, else cvl.example/witness)")
    wkey.set_defaults(func=cmd_witness_key)

    _client_commands(sub, audit)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
