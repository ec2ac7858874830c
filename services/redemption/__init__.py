"""Redemption service: voucher balances consumed from issuing events, and providers redeeming them."""
