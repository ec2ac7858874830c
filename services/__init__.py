"""The compute voucher ledger's services: issuing, redemption, ledger, and their common package."""
