"""The Iceberg copy: one table per topic, its days written from the archive (index, writer)."""
