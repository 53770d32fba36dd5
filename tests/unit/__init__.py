"""Unit tests: one module of medtune each, offline, on the real data in ../shared."""
