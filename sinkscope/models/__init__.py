"""Model adapters: everything sinkscope knows about LMM families lives here."""

from sinkscope.models.base import (  # noqa: F401
    BOS, GENERATED, KIND_NAMES, PAD, TEXT, VISUAL, ModelAdapter, SinkscopeError, TokenKinds,
    UnsupportedModelError, token_kinds_from_ids,
)
from sinkscope.models.registry import adapter_for_model, load, load_hosted, load_placed, supported  # noqa: F401
