"""Logging (and, later, metrics) set up in one place."""
