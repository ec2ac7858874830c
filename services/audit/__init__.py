"""The auditor's offline tool: export the ledger's log and verify it independently of the ledger service."""
