"""Reading archives back: the streaming archive reader and verification (cat, verify)."""
