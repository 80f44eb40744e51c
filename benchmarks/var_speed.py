"""VAR speed: against eager and SDPA, and against per-head-loop implementations of the reference
code's algorithm. Everything is measured in one run and printed as ratios.

1. The embedded `tiny` model (sinkscope.models.load("tiny"), 1.8M parameters, 6 layers): a prefill
   forward and `generate` of 32 new tokens with KV cache, batch of 4 demo questions; eager (the
   language model's implementation as loaded), SDPA, and VAR (calibrated tau and sink dims; layers VAR
   does not edit run on SDPA), unfused and with compile=True. A model this small is bound by per-operation
   host cost, as a 7B decode step on a GPU is by launches.
2. One attention module shaped like LLaVA-1.5-7B's (hidden 4096, 32 heads, 576 image + 64 text
   tokens; LlamaAttention built from a LlamaConfig, random weights): prefill (640 queries) and one
   decode step (1 query, 640 cached keys), through the whole module (projections included) and
   through the attention function alone (query/key/value given). VAR here runs as it does in a model:
   the registered attention function with a VAR session (sinks: BOS + 20 random image tokens).
   The reference algorithm (paper-notes section 7: keeps p of the sink mass and moves 1 - p, "sink
   fraction <= rho", no head in a layer without a visual sink) is timed as two loops written here
   from that description: per head (vectorised over queries) and per head and per query.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/var_speed.py [--repeats 5] [--threads 1]
Timings are medians of `--repeats` runs after one warm-up, on CPU unless a GPU is present.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sinkscope.interventions import attention as A
from sinkscope.interventions.var import ResolvedVAR, VARConfig, VAREdit, calibrate, var
from sinkscope.kinds import TEXT, VISUAL, TokenKinds


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


# ---------------------------------------------------------------------------------------
# 1. the tiny model
# ---------------------------------------------------------------------------------------

def bench_tiny(repeats: int, model_name: str = "tiny") -> dict[str, float]:
    from sinkscope.eval.tasks import load_samples
    from sinkscope.models import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = load(model_name)
    samples = load_samples("demo", limit=4)
    batch = adapter.prepare([s.question for s in samples], [s.image() for s in samples])
    inputs = adapter.forward_inputs(batch)
    config = calibrate(adapter, batch)
    model = adapter.model
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    gen_kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    results = {}
    with torch.no_grad():
        for name in ("eager", "sdpa"):
            adapter.set_text_attention(name)
            results[f"prefill {name}"] = timed(lambda: model(**inputs), repeats * 4)
            results[f"generate {name}"] = timed(lambda: model.generate(**inputs, **gen_kw), repeats)
        adapter.set_text_attention("eager")
        with var(adapter, config):
            results["prefill var"] = timed(lambda: model(**inputs), repeats * 4)
            results["generate var"] = timed(lambda: model.generate(**inputs, **gen_kw), repeats)
        with var(adapter, config, compile=True):  # each layer's edit fused; timed's warm-up run compiles
            results["prefill var compiled"] = timed(lambda: model(**inputs), repeats * 4)
            results["generate var compiled"] = timed(lambda: model.generate(**inputs, **gen_kw), repeats)
    print(f"{model_name}: VAR config tau={config.tau:.3g}, sink dims {config.sink_dims}, layers 2..{adapter.num_layers - 2}")
    return results


# ---------------------------------------------------------------------------------------
# 2. one LLaVA-1.5-7B-shaped attention module
# ---------------------------------------------------------------------------------------

N_IMAGE, N_TEXT, IMAGE_START = 576, 64, 5


def reference_per_head(probs, sink, image, queries, p=0.6, rho=0.5, summ=0.2):
    """The reference algorithm, one head at a time (vectorised over queries). probs [1, head, query, key]."""
    out = probs.clone()
    q_idx = queries[0].nonzero().flatten()
    s, img = sink[0], image[0]
    vs, ns = img & s, img & ~s
    if not vs.any():
        return out
    for h in range(probs.shape[1]):
        rows = out[0, h, q_idx]
        image_att = rows[:, img].sum(-1)
        frac = rows[:, vs].sum(-1) / image_att
        chosen = (image_att >= summ) & (frac <= rho)
        moved = (1 - p) * rows[:, s].sum(-1)
        new = rows.clone()
        new[:, s] = rows[:, s] * p
        new[:, ns] = rows[:, ns] + moved[:, None] * rows[:, ns] / rows[:, ns].sum(-1, keepdim=True)
        out[0, h, q_idx] = torch.where(chosen[:, None], new, rows)
    return out


def reference_per_head_query(probs, sink, image, queries, p=0.6, rho=0.5, summ=0.2):
    """The reference algorithm, one (head, query) at a time."""
    out = probs.clone()
    s, img = sink[0], image[0]
    vs, ns = img & s, img & ~s
    if not vs.any():
        return out
    for h in range(probs.shape[1]):
        for i in queries[0].nonzero().flatten().tolist():
            row = out[0, h, i]
            image_att = row[img].sum()
            if image_att < summ or row[vs].sum() / image_att > rho:
                continue
            moved = (1 - p) * row[s].sum()
            nonsink = row[ns]
            row[ns] = nonsink + moved * nonsink / nonsink.sum()
            row[s] = row[s] * p
    return out


def _masks(device):
    t = IMAGE_START + N_IMAGE + N_TEXT - IMAGE_START  # 640 tokens: BOS + 4 text, 576 image, 59 text
    kind = torch.full((1, t), TEXT, dtype=torch.long)
    kind[0, 0] = 0
    kind[0, IMAGE_START:IMAGE_START + N_IMAGE] = VISUAL
    kinds = TokenKinds(kind.to(device), torch.where(kind == VISUAL, 0, -1).to(device))
    g = torch.Generator().manual_seed(0)
    sink = torch.zeros(1, t, dtype=torch.bool)
    sink[0, 0] = True
    sink[0, IMAGE_START + torch.randperm(N_IMAGE, generator=g)[:20]] = True
    return kinds, sink.to(device)


class _StubAdapter:
    """What an EditSession needs, for one attention module outside a model."""

    def __init__(self, module):
        self.model, self.num_layers = module, 1


def bench_layer(repeats: int, device) -> dict[str, float]:
    from transformers import LlamaConfig
    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, eager_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                      num_hidden_layers=1, max_position_embeddings=4096)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    attn = LlamaAttention(cfg, layer_idx=0).to(device, dtype).eval()
    kinds, sink = _masks(device)
    t = kinds.kind.shape[1]
    x = torch.randn(1, t, 4096, device=device, dtype=dtype)
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.arange(t, device=device)[None]
    cos_sin = rope(x, pos)
    mask = eager_mask(1, t, t, dtype=dtype, device=device)

    edit = VAREdit(ResolvedVAR(VARConfig(sink_dims=[0], tau=1.0), (0,), (0,), 1.0))
    session = A.EditSession(_StubAdapter(attn), [edit])
    prompt = A.PromptInfo(kinds, None)
    session.prompt = prompt
    session.memory(edit)["sinks"] = {0: sink}
    session.memory(edit)["selected"] = {}
    setattr(attn, A.SESSION_ATTR, session)

    def step(past, q):
        start = prompt.first_query() if past == 0 else 0  # as EditSession.begin_forward does
        session.step = A.StepState(session, 1, past, q, False, prompt, start)

    def module_with(name):
        cfg._attn_implementation = name
        return lambda: attn(x, cos_sin, mask)

    # q, k, v as the attention function sees them
    with torch.no_grad():
        h = attn.head_dim
        q = torch.randn(1, 32, t, h, device=device, dtype=dtype)
        k = torch.randn(1, 32, t, h, device=device, dtype=dtype)
        v = torch.randn(1, 32, t, h, device=device, dtype=dtype)
        scaling = h ** -0.5
        queries = prompt.queries_after_image()

        def ref_fn(loop, qq, kk, vv, m, qmask):
            probs = torch.softmax(torch.matmul(qq, kk.transpose(2, 3)) * scaling + m, dim=-1, dtype=torch.float32)
            probs = loop(probs, sink, kinds.visual_mask, qmask).to(qq.dtype)
            return torch.matmul(probs, vv)

        r = {}
        step(0, t)
        for name in ("eager", "sdpa", A.ATTENTION_NAME):
            r[f"module prefill {name}"] = timed(module_with(name), repeats)
        r["fn prefill eager"] = timed(lambda: eager_attention_forward(attn, q, k, v, mask, scaling), repeats)
        r["fn prefill sdpa"] = timed(lambda: sdpa_attention_forward(attn, q, k, v, mask, scaling=scaling), repeats)
        r["fn prefill var"] = timed(lambda: A.sinkscope_attention(attn, q, k, v, mask, scaling), repeats)
        r["fn prefill ref-per-head"] = timed(lambda: ref_fn(reference_per_head, q, k, v, mask, queries), repeats)
        r["fn prefill ref-per-head-query"] = timed(
            lambda: ref_fn(reference_per_head_query, q, k, v, mask, queries), max(1, repeats // 2))
        # the redistribution step alone, on the same prefill probabilities (each variant copies them once)
        probs = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scaling + mask, dim=-1, dtype=torch.float32)
        positions = session.step.query_positions(device)
        r["edit prefill var"] = timed(lambda: edit.edit(probs.clone(), layer=0, query_positions=positions,
                                                        state=session.step), repeats)
        r["edit prefill ref-per-head"] = timed(lambda: reference_per_head(probs, sink, kinds.visual_mask, queries),
                                               repeats)
        r["edit prefill ref-per-head-query"] = timed(
            lambda: reference_per_head_query(probs, sink, kinds.visual_mask, queries), max(1, repeats // 2))
        # one decode step: 1 query against 640 cached keys (the sinks and image tokens of the prompt)
        step(t - 1, 1)
        q1, m1 = q[:, :, -1:], mask[:, :, -1:]
        dec_q = torch.ones(1, 1, dtype=torch.bool, device=device)
        r["fn decode eager"] = timed(lambda: eager_attention_forward(attn, q1, k, v, m1, scaling), repeats * 20)
        r["fn decode sdpa"] = timed(lambda: sdpa_attention_forward(attn, q1, k, v, m1, scaling=scaling), repeats * 20)
        r["fn decode var"] = timed(lambda: A.sinkscope_attention(attn, q1, k, v, m1, scaling), repeats * 20)
        r["fn decode ref-per-head"] = timed(lambda: ref_fn(reference_per_head, q1, k, v, m1, dec_q), repeats * 4)
        r["fn decode ref-per-head-query"] = timed(lambda: ref_fn(reference_per_head_query, q1, k, v, m1, dec_q),
                                                  repeats * 4)
        selected = session.memory(edit)["selected"][0]
    delattr(attn, A.SESSION_ATTR)
    print(f"layer: VAR selected {int(selected.sum())} of {selected.numel()} (head, query) rows in the last decode step")
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--model", default="tiny", help="embedded model for part 1: tiny or organism (planted sinks)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    tiny = bench_tiny(args.repeats, args.model)
    for k, v in tiny.items():
        print(f"  {k:<28} {v * 1000:9.2f} ms")
    for what in ("prefill", "generate"):
        e, s = tiny[f"{what} eager"], tiny[f"{what} sdpa"]
        for name in ("var", "var compiled"):
            v = tiny[f"{what} {name}"]
            print(f"  {args.model} {what}: {name.replace('var', 'VAR')} / eager = {v / e:.3f}   / SDPA = {v / s:.3f}")
    if args.skip_layer:
        return
    layer = bench_layer(args.repeats, device)
    for k, v in layer.items():
        print(f"  {k:<34} {v * 1000:9.2f} ms")
    for what in ("prefill", "decode"):
        v = layer[f"fn {what} var"]
        print(f"  7B-shaped attention fn, {what}: VAR / eager = {v / layer[f'fn {what} eager']:.3f}   "
              f"VAR / SDPA = {v / layer[f'fn {what} sdpa']:.3f}   per-head loop / VAR = "
              f"{layer[f'fn {what} ref-per-head'] / v:.1f}   per-head-per-query loop / VAR = "
              f"{layer[f'fn {what} ref-per-head-query'] / v:.1f}")
    e = layer["edit prefill var"]
    print(f"  7B-shaped redistribution step alone, prefill: per-head loop / VAR = "
          f"{layer['edit prefill ref-per-head'] / e:.1f}   per-head-per-query loop / VAR = "
          f"{layer['edit prefill ref-per-head-query'] / e:.1f}")
    m = layer
    print(f"  7B-shaped attention module, prefill: VAR / eager = "
          f"{m['module prefill ' + A.ATTENTION_NAME] / m['module prefill eager']:.3f}   VAR / SDPA = "
          f"{m['module prefill ' + A.ATTENTION_NAME] / m['module prefill sdpa']:.3f}")


if __name__ == "__main__":
    main()
