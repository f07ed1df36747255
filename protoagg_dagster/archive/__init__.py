"""The archive path: sensor, job and ops, ledger, dedupe window, store, leases, checks, upkeep."""
