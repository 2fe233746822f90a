"""Identities, the v0 upstream client wiring, the refresher."""
