"""The operations an attention edit adds at a decode step, counted exactly: the launch-bound proxy of
benchmarks/dispatch_count.py (a GPU at batch 1 waits on each kernel launch), for regression guards."""

from __future__ import annotations

import collections
import contextlib

# operations that make views or metadata only: they launch no work
VIEWS = {"view", "_unsafe_view", "expand", "transpose", "t", "unsqueeze", "squeeze", "slice", "select", "permute",
         "as_strided", "alias", "detach", "unbind", "split", "lift_fresh", "_reshape_alias", "reshape"}


@contextlib.contextmanager
def decode_step_ops(monkeypatch, edit_cls):
    """Within the block, every call of `edit_cls.edit` at a decode step (`state.only_generated`) counts the operations
    it dispatches, views left out. Yields the counter: `.calls` (edit calls at decode steps) and `.ops` (a Counter
    of operation names over all of them)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.inside, self.ops, self.calls = False, collections.Counter(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[1]
            if self.inside and name not in VIEWS:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    count = Count()
    plain_edit = edit_cls.edit

    def counted_edit(self, probs, *, layer, query_positions, state):
        count.inside = state.only_generated
        count.calls += state.only_generated
        try:
            return plain_edit(self, probs, layer=layer, query_positions=query_positions, state=state)
        finally:
            count.inside = False

    monkeypatch.setattr(edit_cls, "edit", counted_edit)
    with count:
        yield count
