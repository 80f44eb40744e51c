"""The embedded models, as data of the model registry (`sinkscope.models.load("demo" | "tiny" | "organism")`).

- `smolvlm`: the default "demo" LLaVA on the pretrained SmolLM2-135M-Instruct (`smollm` caches that
  language model on first use); only what sinkscope trained is shipped, in `assets/demo/`.
- `modeling`, `processor`, `tiny_data`: the 1.8M-parameter "tiny" model (`assets/tiny/`) and its data.
- `organism`: the tiny model with a sink mechanism planted by weight edits, and its ground truth
  (`assets/organism/`).

Training them and writing their cards are programs in `scripts/`, not part of the library.
"""
