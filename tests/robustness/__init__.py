"""Robustness suite (issue 7); a package so its test module names never clash with tests/."""
