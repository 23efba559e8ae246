"""Helpers shared by test folders (on the path via pytest's `pythonpath`)."""
