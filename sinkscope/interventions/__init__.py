"""Interventions: things that change a forward pass.

attention.py: one registered attention function and scoped, per-model edits of post-softmax
probabilities (`edit_attention`, `AttentionEdit`); knockout.py and var.py are two edits on it.
"""
