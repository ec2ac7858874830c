"""The witness's HTTP interface: C2SP tlog-witness `add-checkpoint` (C2SP/C2SP tlog-witness.md), on 127.0.0.1.

    POST /add-checkpoint   old <size>\\n, consistency proof lines (base64 hashes, at most 63), \\n, a signed checkpoint
      200  our cosignature line (cosignature/v1), once the new size and root are durably stored (state.py)
      400  a malformed request, an old size above the checkpoint's, or a proof with old size 0
      403  no signature on the note verifies under a key we trust for its origin
      404  an origin we do not witness
      409  text/x.tlog.size with the size we last cosigned, when `old` is not that size (an older checkpoint, or a
           client that does not know it), or when it is and the root differs (a fork at the same size)
      422  the consistency proof from the size we hold to the new one does not verify (an inconsistent log)
    GET /key               text/plain: our verifier key (name+keyid+base64(0x04 ‖ key))
    GET /                  text/plain: our name and key, and each log's latest cosigned size and root
    GET /healthz, /readyz  200

The check of `old` against the stored size and the write of the new state happen under one lock, and the state file
is locked against other processes, so two concurrent requests can never roll a log back (the race tlog-witness
describes). The log's signature and the consistency proof are checked with the auditor's own code (services.audit:
note.py, merkle.py), not the ledger's: the witness shares nothing with the log it witnesses.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from typing import Final, NamedTuple

from aiohttp import web

from schemas.limits import SHUTDOWN_TIMEOUT_S, WITNESS_PROOF_LINES_MAX, WITNESS_REQUEST_BYTES_MAX
from services.audit import merkle, note

from . import cosigner
from .config import Config
from .state import State, StateError

__all__ = ["StateError", "create_app", "serve"]

log = logging.getLogger("cvl.witness")

TEXT: Final = "text/plain"
SIZE_CONTENT_TYPE: Final = "text/x.tlog.size"
_OLD_RE: Final = re.compile(r"old (0|[1-9][0-9]{0,18})")

class Request(NamedTuple):
    old_size: int
    proof: list[bytes]
    note: str


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(raw: bytes) -> Request:
    """The add-checkpoint body: 400 (Refused) when it is not one."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise Refused(400, "the body is not UTF-8") from None
    head, sep, signed = text.partition("\n\n")
    if not sep:
        raise Refused(400, "no empty line between the old size and proof lines and the checkpoint")
    lines = head.split("\n")
    match = _OLD_RE.fullmatch(lines[0])
    if not match:
        raise Refused(400, "the first line is not `old <size>` (decimal, no leading zeros)")
    if len(lines) - 1 > WITNESS_PROOF_LINES_MAX:
        raise Refused(400, f"more than {WITNESS_PROOF_LINES_MAX} consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            h = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise Refused(400, f"proof line {line[:60]!r} is not base64") from None
        if len(h) != merkle.HASH_SIZE:
            raise Refused(400, f"proof line {line[:60]!r} is not a {merkle.HASH_SIZE}-byte hash")
        proof.append(h)
    if not signed.endswith("\n") or "\n\n" not in signed:
        raise Refused(400, "the checkpoint is not a signed note")
    return Request(int(match.group(1)), proof, signed)


class Witness:
    def __init__(self, cfg: Config, key: cosigner.CosignerKey, state: State):
        self.cfg, self.key, self.state = cfg, key, state
        self.lock = asyncio.Lock()   # check-then-persist is atomic within the process; the file lock across them

    async def add_checkpoint(self, raw: bytes) -> str:
        """Our cosignature line for the checkpoint in `raw`, or Refused with the status tlog-witness gives."""
        req = parse_request(raw)
        origin = req.note.split("\n", 1)[0]
        keys = self.cfg.logs.get(origin)
        if keys is None:
            raise Refused(404, f"unknown log origin {origin[:100]!r}")
        body = _verified_body(req.note, keys)
        try:
            checkpoint = note.parse_checkpoint(body)
        except note.NoteError as exc:
            raise Refused(400, str(exc)) from None
        size, root = checkpoint.tree_size, checkpoint.root
        if req.old_size > size:
            raise Refused(400, f"old size {req.old_size} is above the checkpoint's size {size}")
        async with self.lock:
            known = self.state.get(origin)
            known_size = known.size if known else 0
            if req.old_size != known_size:
                raise Conflict(known_size, f"old size {req.old_size}, but the latest checkpoint cosigned for "
                                           f"{origin} has size {known_size}")
            if known is None or known_size == 0:
                if req.proof:
                    raise Refused(400, "a proof from old size 0 must be empty")
            elif size == known_size:
                if root != known.root:
                    log.error("a checkpoint of the same size with another root: a fork",
                              extra={"origin": origin, "tree_size": size})
                    raise Conflict(known_size, f"tree size {size} with another root than the one cosigned")
                if req.proof:
                    raise Refused(422, "a proof between equal sizes must be empty")
            else:
                try:
                    merkle.verify_consistency(known_size, size, known.root, root, req.proof)
                except merkle.ProofError as exc:
                    log.error("an inconsistent checkpoint: not cosigned",
                              extra={"origin": origin, "old_size": known_size, "tree_size": size, "error": str(exc)})
                    raise Refused(422, f"the consistency proof from {known_size} to {size} does not verify: "
                                       f"{exc}") from None
            await asyncio.to_thread(self.state.put, origin, size, root)
            line = self.key.cosign(body, int(time.time()))
        log.debug("cosigned", extra={"origin": origin, "tree_size": size})
        return line


WITNESS: Final = web.AppKey("witness", Witness)


class Conflict(Refused):
    def __init__(self, known_size: int, message: str):
        super().__init__(409, message)
        self.known_size = known_size


def _verified_body(signed: str, keys: list[note.VerifierKey]) -> str:
    """The note's body when a signature by one of `keys` verifies (others' signatures are ignored); 403 if none."""
    problems = []
    for key in keys:
        try:
            return note.verify_note(signed, key)
        except note.NoteError as exc:
            problems.append(str(exc))
    raise Refused(403, "; ".join(problems))


# --- handlers ---------------------------------------------------------------------------------------------------------

async def post_add_checkpoint(request: web.Request) -> web.Response:
    witness = request.app[WITNESS]
    try:
        line = await witness.add_checkpoint(await request.read())
    except Conflict as exc:
        log.info("add-checkpoint: 409: %s", exc)
        return web.Response(status=409, text=f"{exc.known_size}\n", content_type=SIZE_CONTENT_TYPE)
    except Refused as exc:
        log.warning("add-checkpoint: %d: %s", exc.status, exc)
        return web.Response(status=exc.status, text=f"{exc}\n", content_type=TEXT)
    return web.Response(text=line + "\n", content_type=TEXT, charset="utf-8")


async def get_key(request: web.Request) -> web.Response:
    witness = request.app[WITNESS]
    return web.Response(text=witness.key.verifier() + "\n", content_type=TEXT, charset="utf-8")


async def get_index(request: web.Request) -> web.Response:
    witness = request.app[WITNESS]
    lines = [f"cvl witness {witness.key.name}", witness.key.verifier(), ""]
    for origin in sorted(witness.cfg.logs):
        s = witness.state.get(origin)
        lines.append(f"{origin} size {s.size if s else 0} root {base64.b64encode(s.root).decode() if s else '-'}")
    return web.Response(text="\n".join(lines) + "\n", content_type=TEXT, charset="utf-8")


async def get_health(request: web.Request) -> web.Response:
    return web.Response(text="ok\n", content_type=TEXT)


def create_app(cfg: Config) -> web.Application:
    key = cosigner.load_key(cfg.run_dir, cfg.name)
    state = State(cfg.state)
    app = web.Application(client_max_size=WITNESS_REQUEST_BYTES_MAX)  # a larger body is 413
    app[WITNESS] = Witness(cfg, key, state)
    app.router.add_post("/add-checkpoint", post_add_checkpoint)
    app.router.add_get("/key", get_key)
    app.router.add_get("/", get_index)
    app.router.add_get("/healthz", get_health)
    app.router.add_get("/readyz", get_health)

    async def close_state(app: web.Application) -> None:
        state.close()
    app.on_cleanup.append(close_state)
    log.info("witness ready", extra={"verifier_key": key.verifier(), "logs": sorted(cfg.logs),
                                     "state": str(cfg.state), "port": cfg.port})
    return app


def serve(cfg: Config) -> None:
    web.run_app(create_app(cfg), host=cfg.host, port=cfg.port, print=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                access_log=None)
