"""Error types every layer of sinkscope shares (the bottom of the import graph)."""

from __future__ import annotations


class SinkscopeError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""


class UnsupportedModelError(SinkscopeError):
    """The model's family or attention implementation is not one sinkscope can handle."""
