"""Issuing service: cities, budgets, provider whitelist, minting vouchers within budget."""
