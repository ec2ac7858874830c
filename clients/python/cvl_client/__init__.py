"""cvl_client: a typed Python client (sync and async) for the compute voucher ledger's three services.

    from cvl_client import RedemptionClient
    with RedemptionClient("http://127.0.0.1:8082", token) as cvl:
        cvl.wait_redeemable(voucher_id, timeout_s=10)
        r = cvl.redeem(voucher_id, 120_000, invoice_number="INV-1", invoice_amount=400_000)

It imports nothing of the server: install it alone with `pip install ./clients/python`.
"""
from . import errors, merkle, note, types
from .client import (
    AsyncIssuingClient, AsyncLedgerClient, AsyncRedemptionClient, IssuingClient, LedgerClient, RedemptionClient,
    new_idempotency_key, voucher_body,
)
from .errors import *  # noqa: F401,F403  (the exceptions, named by problem code)
from .note import Checkpoint, VerifierKey

__all__ = ["AsyncIssuingClient", "AsyncLedgerClient", "AsyncRedemptionClient", "Checkpoint", "IssuingClient",
           "LedgerClient", "RedemptionClient", "VerifierKey", "errors", "merkle", "new_idempotency_key", "note",
           "types", "voucher_body"] + [name for name in dir(errors) if name[0].isupper()]
