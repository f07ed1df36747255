"""Backfill: offset or time ranges submitted as archive runs."""
