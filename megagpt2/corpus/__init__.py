"""Corpus building, offline: read scrapes, clean, deduplicate and tokenize them into the
MMIDIDX datasets that megagpt2.data reads during training (tools/preprocess_data.py)."""
