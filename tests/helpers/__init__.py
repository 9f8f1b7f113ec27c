"""Helpers shared by several test modules (tiny models, fixture paths)."""
