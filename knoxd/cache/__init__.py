"""The encrypted on-disk cache and its in-memory view."""
