"""Example handler plugins used by the tests (see handlers.py)."""
