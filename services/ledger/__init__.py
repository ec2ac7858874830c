"""Ledger service: every event becomes one journal entry of balanced postings, for government auditors."""
