"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP vision tower + pooled projector + the
Gemma 3 language model (GQA, explicit head_dim, interleaved sliding-window / global layers,
query/key RMSNorm, zero-centred RMSNorm weights `x * (1 + w)`, embeddings scaled by
sqrt(hidden_size)).

transformers 5 paths: `model.model.language_model` (Gemma3TextModel) with `.layers` and
`.norm`; `model.lm_head` (tied to the embeddings). The image placeholder id is stored as
`config.image_token_index` (262144 on the released checkpoints; `config.image_token_id` is an
alias via the config's attribute_map). Each image expands to
`\\n\\n<start_of_image>` + mm_tokens_per_image x `<image_soft_token>` + `<end_of_image>\\n\\n`;
the boi/eoi tokens (`config.boi_token_index` / `config.eoi_token_index`) are text, not visual.
Note that Gemma3Processor.image_token_id is the *boi* id, not the placeholder id: use the config.
The processor returns `token_type_ids` (1 on image tokens) which the forward needs to give
image tokens bidirectional attention within their image.
"""

from __future__ import annotations

from sinkscope.models.base import ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    # the placeholder id is `image_token_index` (`image_token_id` is an alias; the processor's
    # `image_token_id` is the start-of-image token, not the placeholder)
    image_token_attributes = ("image_token_index", "image_token_id")
