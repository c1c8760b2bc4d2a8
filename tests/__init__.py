"""Winnow tests (a package, so that `tests.support` imports under pytest from the repo root)."""
