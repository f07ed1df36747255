"""Restore: archived records written back into Kafka exactly once (writer, op, job)."""
