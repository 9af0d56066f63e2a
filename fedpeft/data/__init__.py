"""A user's private data: corpora and task records -> users -> train/held-out examples -> token blocks."""
