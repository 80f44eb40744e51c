"""The head and contribution analyses' per-batch tables, built from arrays once per batch, equal the literal build
as their reducers' `take` made it before: one frame per (layer, sample) for heads and image tokens, one per
(layer, map sample, head, query word) for the maps, one per (layer, token class, sample) for contributions. Each
pair of reducers reads the same trace of the organism. And run here, both reducers wait for the device once per
batch, not once per layer (driven by hand on the meta device)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sinkscope.analyses.common import prepare_batch
from sinkscope.analyses.contributions import CLASSES, ContributionReducer, output_grams
from sinkscope.analyses.heads import HeadsConfig, HeadsLayerReduction, HeadsReducer
from sinkscope.eval.tasks import load_samples
from sinkscope.trace import Tracer

ASSET = Path(__file__).resolve().parent.parent / "sinkscope" / "models" / "embedded" / "assets" / "organism"


class LiteralHeadsReducer(HeadsReducer):
    """Frames made one (layer, sample), and for maps one (layer, sample, head, query), at a time."""

    def take(self, kind, layer, payload):
        if kind == "residual":
            return super().take(kind, layer, payload)
        p, q = payload, self.queries
        for b, sid in enumerate(self.info.sample_ids):
            n_queries = int(q[b].sum())
            if n_queries == 0:
                continue
            self.head_rows.append(pd.DataFrame({
                "sample": sid, "layer": layer, "head": range(p["image_attention"].shape[1]),
                **{name: p[name][b].numpy() for name in HeadsLayerReduction.PER_HEAD}, "n_queries": n_queries,
            }))
            vis = torch.nonzero(self.visual[b]).flatten()
            if len(vis):
                self.token_rows.append(pd.DataFrame({
                    "sample": sid, "layer": layer, "position": self.real_pos[b, vis].numpy(),
                    "visual_rank": self.visual_rank[b, vis].numpy(), "token_kind": "visual",
                    "phi": self.phi[layer][b, vis].numpy(), "is_sink": self.sink[layer][b, vis].numpy(),
                    "attention_received": p["received"][b, vis].numpy(),
                }))
            if b in p["maps"] and len(vis):
                queries = torch.nonzero(q[b]).flatten()[: self.cfg.map_words]
                a = p["maps"][b]
                heads = list(range(a.shape[0] - 1)) + ["mean"]
                for hi, head in enumerate(heads):
                    for qi, qpos in enumerate(queries.tolist()):
                        word = self.strings[b][qpos] if self.strings else str(qpos)
                        self.map_rows.append(pd.DataFrame({
                            "sample": sid, "layer": layer, "head": str(head),
                            "query_position": int(self.real_pos[b, qpos]), "query_token": word,
                            "visual_rank": np.arange(len(vis)), "attention": a[hi, qi].numpy(),
                            "is_sink": self.sink[layer][b, vis].numpy(),
                        }))

    def build(self):  # rows made in take
        pass


def test_head_token_and_map_tables_equal_the_literal_build(organism_adapter):
    adapter = organism_adapter
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    samples = load_samples("demo", 3)
    cfg = HeadsConfig(model="organism", map_words=3)
    map_ids = {samples[0].sample_id, samples[2].sample_id}

    def make(cls):
        return cls(truth["sink_dims"], 100.0, adapter.rms_norm_eps, "layer", cfg, map_ids, adapter.token_strings)

    fast, literal = make(HeadsReducer), make(LiteralHeadsReducer)
    Tracer(adapter).run(prepare_batch(adapter, samples), [fast, literal], sample_ids=[s.sample_id for s in samples])
    for name in ("head_rows", "token_rows", "map_rows"):
        got = pd.concat(getattr(fast, name), ignore_index=True)
        expected = pd.concat(getattr(literal, name), ignore_index=True)
        pd.testing.assert_frame_equal(got, expected, check_exact=True, obj=name)
    tokens = pd.concat(literal.token_rows)
    maps = pd.concat(literal.map_rows)
    assert tokens["is_sink"].any() and not tokens["is_sink"].all()  # the organism's planted sinks, and others
    assert set(maps["sample"]) == map_ids and "mean" in set(maps["head"]) and maps["query_token"].nunique() > 1
    assert len(fast.map_rows) == 2 * adapter.num_layers  # one frame per layer and map sample, not per head and word


class LiteralContributionReducer(ContributionReducer):
    """Frames made one (layer, token class, sample) at a time."""

    def take(self, kind, layer, payload):
        if kind != "attention":  # phi of the residual stream, nothing of the values
            return super().take(kind, layer, payload)
        n_queries = self.queries.sum(dim=1)
        for name in CLASSES:
            p = payload[name]
            for b, sid in enumerate(self.info.sample_ids):
                if int(p["n_tokens"][b]) == 0 or int(n_queries[b]) == 0:
                    continue
                self.rows.append(pd.DataFrame({
                    "sample": sid, "layer": layer, "head": range(p["attention"].shape[1]), "token_class": name,
                    "n_tokens": int(p["n_tokens"][b]), "attention": p["attention"][b].numpy(),
                    "ov_norm": p["ov_norm"][b].numpy(), "contribution": p["contribution"][b].numpy(),
                }))

    def build(self):  # rows made in take
        pass


def test_contribution_tables_equal_the_literal_build(organism_adapter):
    adapter = organism_adapter
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    samples = load_samples("demo", 3)
    grams = output_grams(adapter)

    def make(cls):
        return cls(truth["sink_dims"], 100.0, adapter.rms_norm_eps, "layer", grams)

    fast, literal = make(ContributionReducer), make(LiteralContributionReducer)
    Tracer(adapter).run(prepare_batch(adapter, samples), [fast, literal], sample_ids=[s.sample_id for s in samples],
                        values=True)
    expected = pd.concat(literal.rows, ignore_index=True)
    pd.testing.assert_frame_equal(pd.concat(fast.rows, ignore_index=True), expected, check_exact=True)
    assert set(expected["token_class"]) == set(CLASSES) and len(fast.rows) == 1  # sinks, non-sinks, BOS; one frame


# ----------------------------------------------------------------------------- a local run waits once per batch

class _HostCrossings(TorchDispatchMode):
    """Records what crosses between the host and the meta device: copies to the CPU (`to_host`, their dtypes;
    answered with `_host_value`, zeros, as meta holds no values) and any operation mixing CPU and meta tensors or
    copying from the CPU (`mixed`)."""

    def __init__(self):
        super().__init__()
        self.to_host, self.mixed, self.sizes = [], [], []  # sizes: elements of each copy to the host

    @staticmethod
    def _host_value(x: torch.Tensor, dtype) -> torch.Tensor:
        return torch.zeros(x.shape, dtype=dtype)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "meta" \
                and str(kwargs.get("device")) == "cpu":
            self.to_host.append(kwargs.get("dtype") or args[0].dtype)
            self.sizes.append(args[0].numel())
            return self._host_value(args[0], self.to_host[-1])
        if {t.device.type for t in tensors if t.dim()} == {"cpu", "meta"} or (
                func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu"):
            self.mixed.append(func._schema.name)
        return func(*args, **kwargs)


def _planted_batch():
    """Two rows (left and right padding), three image tokens each, text queries after them."""
    from sinkscope.kinds import BOS, PAD, TEXT, VISUAL, TokenKinds
    from sinkscope.trace import BatchInfo

    kind = torch.tensor([[PAD, PAD, BOS, TEXT, VISUAL, VISUAL, VISUAL, TEXT, TEXT],
                         [BOS, TEXT, VISUAL, VISUAL, VISUAL, TEXT, TEXT, PAD, PAD]])
    kinds = TokenKinds(kind, torch.where(kind == VISUAL, 0, -1))
    return BatchInfo(torch.zeros(kind.shape, dtype=torch.long), kinds, ["a", "b"])


def _drive_on_meta(reducer, n_layers: int, values: bool = False):
    """A local trace of `n_layers` layers on the meta device by hand; returns the crossings of each layer's calls
    and those of `end()`."""
    info = _planted_batch()
    reducer.begin(info)
    per_layer = []
    for layer in range(n_layers):
        with _HostCrossings() as crossings:
            reducer.residual(layer, torch.empty(2, 9, 16, device="meta"))
            if values:
                reducer.values(layer, torch.empty(2, 2, 9, 4, device="meta"))
            reducer.attention(layer, torch.empty(2, 4, 9, 9, device="meta"))
        per_layer.append(crossings)
    with _HostCrossings() as at_end:
        reducer.end()
    return per_layer, at_end


@pytest.mark.parametrize("n_layers", [2, 6])
def test_a_local_head_analysis_waits_for_the_device_once_per_batch(n_layers):
    """Run here, the head analysis keeps each layer's state and query rows during the forward and reads nothing
    back (on meta, where a read or a `nonzero` fails, the layers complete, and nothing crosses between host and
    device in any layer); `end()` reduces the kept layers in blocks and brings every layer's payloads, maps
    included, to the host in one copy, whatever the number of layers."""
    cfg = HeadsConfig(model="planted", map_words=2)
    reducer = HeadsReducer([3], 2.0, 1e-6, "rms", cfg, {"b"}, None)
    per_layer, at_end = _drive_on_meta(reducer, n_layers)
    assert all(not c.mixed and not c.to_host for c in per_layer), [c.mixed + c.to_host for c in per_layer]
    assert at_end.to_host == [torch.float32]
    heads = pd.concat(reducer.head_rows)
    maps = pd.concat(reducer.map_rows)
    assert len(heads) == n_layers * 2 * 4 and sorted(set(heads["layer"])) == list(range(n_layers))
    assert len(maps) == n_layers * 5 * 2 * 3 and set(maps["sample"]) == {"b"}  # (4 heads + mean) x 2 words x 3


@pytest.mark.parametrize("n_layers", [2, 6])
def test_a_local_contribution_analysis_waits_for_the_device_once_per_batch(n_layers):
    """The same for the contribution analysis (W_O's per-head grams on the layer's device): one copy per
    dtype of its payloads (float32 means, int64 token counts) for the whole batch."""
    grams = {i: torch.empty(4, 4, 4, dtype=torch.float64, device="meta") for i in range(n_layers)}
    reducer = ContributionReducer([3], 2.0, 1e-6, "rms", grams)
    per_layer, at_end = _drive_on_meta(reducer, n_layers, values=True)
    assert per_layer[0].mixed
    assert all(not c.mixed and not c.to_host for c in per_layer[1:]), [c.mixed + c.to_host for c in per_layer]
    assert sorted(at_end.to_host, key=str) == [torch.float32, torch.int64] and not at_end.mixed


def test_payloads_to_host_keeps_structure_and_order_in_one_copy_per_dtype():
    """Tensors in nested dicts and lists come back on the CPU with their shapes, in their places, each the slice
    of its (device, dtype) group's single copy in the order the leaves were met; CPU leaves are left as they are."""
    from sinkscope.analyses.common import payloads_to_host

    cpu_leaf = torch.arange(3)
    payloads = [{"phi": torch.empty(2, 3, device="meta")},
                {"a": {"x": torch.empty(2, 2, device="meta"), "n": torch.empty(2, dtype=torch.long, device="meta")},
                 "maps": {1: torch.empty(1, 2, 3, device="meta")}, "kept": cpu_leaf}]

    class Numbered(_HostCrossings):  # each copy answered 0, 1, 2, ... in its dtype
        @staticmethod
        def _host_value(x, dtype):
            return torch.arange(x.numel()).to(dtype).view(x.shape)

    with Numbered() as copies:
        got = payloads_to_host(payloads)
    assert copies.to_host == [torch.float32, torch.int64]
    assert torch.equal(got[0]["phi"], torch.arange(0, 6, dtype=torch.float32).view(2, 3))
    assert torch.equal(got[1]["a"]["x"], torch.arange(6, 10, dtype=torch.float32).view(2, 2))
    assert torch.equal(got[1]["maps"][1], torch.arange(10, 16, dtype=torch.float32).view(1, 2, 3))
    assert torch.equal(got[1]["a"]["n"], torch.arange(2)) and got[1]["kept"] is cpu_leaf
    assert payloads_to_host([]) == []


def test_no_attention_map_reaches_the_host_in_the_reducers_that_reduce_it():
    """Ablation's attention received, patching's image-centric heads and the viewer reduce each layer's
    [batch, head, query, key] probabilities where they are: no copy to the host holds a [query, key] map (at 7B
    width that is 52 MB per layer and sample). Driven on the meta device, each copy's size recorded."""
    from sinkscope.analyses.ablate import _PhiAttention
    from sinkscope.analyses.patching import _SinksAndHeads
    from sinkscope.viewer import _ViewerReducer

    info = _planted_batch()
    info = type(info)(info.input_ids[:1], type(info.token_kinds)(info.token_kinds.kind[:1],
                                                                 info.token_kinds.image_index[:1]), ["a"])
    n_tokens, n_heads = info.input_ids.shape[1], 4
    for reducer in (_PhiAttention([3], 2.0, 1e-6, "rms", 0), _SinksAndHeads([3], 2.0, 1e-6, "rms", 0.5, 0.2, 0),
                    _ViewerReducer([3], 2.0, "rms", 1e-6)):
        reducer.begin(info)
        with _HostCrossings() as crossings:
            for layer in range(2):
                reducer.residual(layer, torch.empty(1, n_tokens, 16, device="meta"))
                reducer.attention(layer, torch.empty(1, n_heads, n_tokens, n_tokens, device="meta"))
            reducer.end()
        # the copies may carry every layer's small results at once: still less than one head's map per layer
        assert crossings.sizes and max(crossings.sizes) < 2 * n_tokens * n_tokens, (type(reducer), crossings.sizes)


@pytest.mark.parametrize("which", ["ablate", "patching", "vit_sinks"])
@pytest.mark.parametrize("n_layers", [2, 6])
def test_the_sink_aware_reducers_wait_for_the_device_once_per_batch(which, n_layers):
    """Ablation's, patching's and the ViT-sink analysis' reducers keep phi, the sink masks and their own results
    (attention received, image-centric heads, the first layer's token norms and top dims) where each layer ran: no layer
    copies anything to or from the host (the batch's token masks reach the device once, at the first layer), and
    `end()` brings everything over in one copy per dtype (float32 and bool) whatever the number of layers."""
    from sinkscope.analyses.ablate import _PhiAttention
    from sinkscope.analyses.patching import _SinksAndHeads
    from sinkscope.analyses.vit_sinks import VitReducer, VitSinksConfig

    reducer = {"ablate": lambda: _PhiAttention([3], 2.0, 1e-6, "rms", 0),
               "patching": lambda: _SinksAndHeads([3], 2.0, 1e-6, "rms", 0.5, 0.2, 0),
               "vit_sinks": lambda: VitReducer([3], 2.0, 1e-6, "rms", VitSinksConfig(model="planted"))}[which]()
    per_layer, at_end = _drive_on_meta(reducer, n_layers)
    assert per_layer[0].mixed and not per_layer[0].to_host  # the token masks, sent once
    assert all(not c.mixed and not c.to_host for c in per_layer[1:]), [c.mixed + c.to_host for c in per_layer]
    # ablation and patching bring phi and the sink masks; vit-sinks (an in-trace part) phi, norms and top dims, the
    # sink masks then made on the host
    dtypes = [torch.float32, torch.int64] if which == "vit_sinks" else [torch.bool, torch.float32]
    assert sorted(at_end.to_host, key=str) == dtypes and not at_end.mixed
    assert sorted(reducer.phi) == list(range(n_layers)) and all(t.device.type == "cpu" for t in reducer.phi.values())
    assert all(m.device.type == "cpu" and m.dtype == torch.bool for m in (*reducer.sink.values(),
                                                                         *reducer.visual_sink.values()))
    own = {"ablate": lambda: [reducer.received], "patching": lambda: list(reducer.centric.values()),
           "vit_sinks": lambda: [torch.tensor(reducer.rows["norm"].tolist())]}[which]()
    assert own and all(t.device.type == "cpu" and t.numel() for t in own)


@pytest.mark.parametrize("block_bytes,keep_bytes", [(2**29, 2**31), (1, 2**31), (2**29, 1), (2**29, 4000)])
def test_deferred_head_reductions_equal_the_per_layer_ones(block_bytes, keep_bytes):
    """The head analysis' part run here (deferred: inputs kept, reduced in blocks of layers after the forward; one
    layer per block with block_bytes=1; reduced during the forward whenever the kept layers would pass keep_bytes,
    each layer alone with 1, layers 0-1 together with 4000, and the store never holding more than that plus a
    layer) gives each layer the payload the per-layer part of a remote trace gives: phi, the per-head measures,
    attention received and the maps, on a batch with left and right padding."""
    from sinkscope.analyses.heads import HeadsLayerReduction

    info = _planted_batch()
    kinds = info.token_kinds
    g = torch.Generator().manual_seed(5)
    queries = kinds.queries_after_image(include_generated=True)

    def part(defer):
        return HeadsLayerReduction([3], 2.0, 1e-6, "rms", kinds.real_mask, kinds.visual_mask, queries, 0.5, 0.2,
                                   [1], 2, host=True, defer=defer, block_bytes=block_bytes, keep_bytes=keep_bytes)

    per_layer, deferred = part(False), part(True)
    reductions, reduce = [], deferred._store._reduce  # the layers of each reduction of the store
    deferred._store._reduce = lambda kept: reductions.append(sorted(kept["residual"])) or reduce(kept)
    expected = []
    for layer in range(3):
        states = torch.randn(2, 9, 16, generator=g)
        states[:, :, 3] += 30.0 * (torch.arange(9) % 4 == 0)  # sinks on some tokens
        probs = torch.softmax(torch.randn(2, 4, 9, 9, generator=g), dim=-1)
        expected += [("residual", layer, per_layer.residual(layer, states)),
                     ("attention", layer, per_layer.attention(layer, probs))]
        assert deferred.residual(layer, states) is None and deferred.attention(layer, probs) is None
        layer_bytes = 4 * (states.numel() + probs[:, :, deferred.query_rows[0]:].numel())
        assert deferred._store.bytes <= keep_bytes + layer_bytes
    got = deferred.finish()
    assert reductions == {2**31: [[0, 1, 2]], 1: [[0], [1], [2]], 4000: [[0, 1], [2]]}[keep_bytes]
    order = [(kind, layer) for kind, layer, _ in got]
    assert sorted(order) == sorted((kind, layer) for kind, layer, _ in expected)
    assert all(order.index(("residual", layer)) < order.index(("attention", layer)) for layer in range(3))
    want = {(kind, layer): payload for kind, layer, payload in expected}
    for kind, layer, a in got:
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a), torch.utils._pytree.tree_flatten(want[kind, layer])
        assert flat_a[1] == flat_b[1]
        for x, y in zip(flat_a[0], flat_b[0]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    sinks = sum(int((p >= 2.0).sum()) for kind, _, p in got if kind == "residual")
    assert sinks > 0 and not deferred._store.kept["residual"] and not deferred._store.kept["attention"]


def test_deferred_head_blocks_never_mix_devices():
    """A model split across devices keeps each layer's inputs where the layer ran: the head analysis reduces runs
    of layers on one device, each where it is (layers 0-1 on the CPU, 2-4 on the meta device; residual 0-2 on the
    CPU, as a layer's input may still sit where the previous layer left it)."""
    from conftest import feed_layers_split_across_devices
    from sinkscope.analyses.heads import HeadsLayerReduction

    info = _planted_batch()
    kinds = info.token_kinds
    part = HeadsLayerReduction([3], 2.0, 1e-6, "rms", kinds.real_mask, kinds.visual_mask,
                               kinds.queries_after_image(include_generated=True), 0.5, 0.2, [0], 2, host=False,
                               defer=True)
    feed_layers_split_across_devices(part, batch=2, seed=6)
    got = part.finish()
    devices = [(kind, layer, {leaf.device.type for leaf in torch.utils._pytree.tree_leaves(payload)})
               for kind, layer, payload in got]
    assert devices == [("residual", 0, {"cpu"}), ("residual", 1, {"cpu"}), ("residual", 2, {"cpu"}),
                       ("residual", 3, {"meta"}), ("residual", 4, {"meta"}), ("attention", 0, {"cpu"}),
                       ("attention", 1, {"cpu"}), ("attention", 2, {"meta"}), ("attention", 3, {"meta"}),
                       ("attention", 4, {"meta"})]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_checks.sh runs it on a GPU)")
def test_head_and_contribution_tables_on_cuda_equal_those_on_the_cpu(organism_adapter):
    """On a GPU the head analysis' deferred blocks and both analyses' single copy per dtype (`payloads_to_host`,
    real device-to-host copies) give the tables the CPU gives, within float32 tolerance."""
    import copy

    from sinkscope.models.registry import adapter_for_model

    adapter = organism_adapter
    on_gpu = adapter_for_model(copy.deepcopy(adapter.model).to("cuda"), adapter.processor, adapter.name)
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    samples = load_samples("demo", 3)
    cfg = HeadsConfig(model="organism", map_words=3)
    tables = {}
    for where, a in (("cpu", adapter), ("cuda", on_gpu)):
        heads = HeadsReducer(truth["sink_dims"], 100.0, a.rms_norm_eps, "layer", cfg, {samples[0].sample_id},
                             a.token_strings)
        contributions = ContributionReducer(truth["sink_dims"], 100.0, a.rms_norm_eps, "layer", output_grams(a))
        ids = [s.sample_id for s in samples]
        Tracer(a).run(prepare_batch(a, samples), [heads], sample_ids=ids)
        Tracer(a).run(prepare_batch(a, samples), [contributions], sample_ids=ids, values=True)
        tables[where] = {"heads": pd.concat(heads.head_rows), "tokens": pd.concat(heads.token_rows),
                         "maps": pd.concat(heads.map_rows), "contributions": pd.concat(contributions.rows)}
    for name in tables["cpu"]:
        pd.testing.assert_frame_equal(tables["cuda"][name], tables["cpu"][name], rtol=1e-4, atol=1e-6, obj=name)


def _sink_aware_results(adapter, samples, dims) -> dict[str, torch.Tensor]:
    """The CPU results of ablation's, patching's and the ViT-sink analysis' reducers on one batch, by name."""
    from sinkscope.analyses.ablate import _PhiAttention
    from sinkscope.analyses.patching import _SinksAndHeads
    from sinkscope.analyses.vit_sinks import VitReducer, VitSinksConfig

    phi_attention = _PhiAttention(dims, 100.0, adapter.rms_norm_eps, "layer", 2)
    heads = _SinksAndHeads(dims, 100.0, adapter.rms_norm_eps, "layer", 0.5, 0.2, 2)
    vit = VitReducer(dims, 100.0, adapter.rms_norm_eps, "layer", VitSinksConfig(model="organism"))
    Tracer(adapter).run(prepare_batch(adapter, samples), [phi_attention, heads, vit])
    out = {"received": phi_attention.received, "max_phi": phi_attention.max_phi(),
           "token norms": torch.tensor(vit.rows["norm"].tolist())}  # (top dims: an argmax may flip on a near tie)
    for layer in sorted(heads.phi):
        out.update({f"phi {layer}": heads.phi[layer], f"sink {layer}": heads.sink[layer],
                    f"visual sink {layer}": heads.visual_sink[layer]})
    out.update({f"centric {layer}": m for layer, m in heads.centric.items()})
    return out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_checks.sh runs it on a GPU)")
def test_sink_aware_reducers_on_cuda_equal_those_on_the_cpu(organism_adapter):
    """On a GPU, ablation's, patching's and the ViT-sink analysis' reducers (phi, sinks, attention received,
    image-centric heads, token norms and top dims kept on the device, brought over in `end`) give the CPU's results:
    masks exactly, floats within float32 tolerance; every result is on the CPU."""
    import copy

    from sinkscope.models.registry import adapter_for_model

    adapter = organism_adapter
    on_gpu = adapter_for_model(copy.deepcopy(adapter.model).to("cuda"), adapter.processor, adapter.name)
    dims = json.loads((ASSET / "ground_truth.json").read_text())["sink_dims"]
    samples = load_samples("demo", 3)
    cpu, cuda = _sink_aware_results(adapter, samples, dims), _sink_aware_results(on_gpu, samples, dims)
    assert sorted(cpu) == sorted(cuda) and any(k.startswith("centric") for k in cpu)
    for name, want in cpu.items():
        got = cuda[name]
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape, name
        if want.dtype == torch.bool:
            assert torch.equal(got, want), name
        else:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), name


def test_deferred_contribution_reductions_equal_the_per_layer_ones():
    """The contribution analysis' part run here (deferred: per layer only || W_O^h v_j || and the attention each
    key gets from the queries, the class means in one block after the forward) gives each layer the payload the
    per-layer part of a remote trace gives, with grouped-query values and left and right padding."""
    from sinkscope.analyses.contributions import ContributionLayerReduction
    from sinkscope.measures.contributions import ov_grams

    info = _planted_batch()
    kinds = info.token_kinds
    g = torch.Generator().manual_seed(8)
    grams = {layer: ov_grams(torch.randn(16, 4 * 4, generator=g), 4) for layer in range(3)}

    def part(defer):
        return ContributionLayerReduction([3], 2.0, 1e-6, "rms", kinds.real_mask, kinds.visual_mask, kinds.bos_mask,
                                          kinds.queries_after_image(include_generated=True), grams, host=True,
                                          defer=defer)

    per_layer, deferred = part(False), part(True)
    expected = {}
    for layer in range(3):
        states = torch.randn(2, 9, 16, generator=g)
        states[:, :, 3] += 30.0 * (torch.arange(9) % 3 == 0)
        values = torch.randn(2, 2, 9, 4, generator=g)  # 2 kv heads for 4 query heads
        probs = torch.softmax(torch.randn(2, 4, 9, 9, generator=g), dim=-1)
        for p in (per_layer, deferred):
            p.residual(layer, states)
            p.values(layer, values)
        expected[layer] = per_layer.attention(layer, probs)
        assert deferred.attention(layer, probs) is None
    got = deferred.finish()
    assert [(kind, layer) for kind, layer, _ in got] == [("attention", layer) for layer in range(3)]
    for _, layer, payload in got:
        flat, spec = torch.utils._pytree.tree_flatten(payload)
        flat_want, spec_want = torch.utils._pytree.tree_flatten(expected[layer])
        assert spec == spec_want
        for x, y in zip(flat, flat_want):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert any(int(p["visual_sink"]["n_tokens"].sum()) > 0 for _, _, p in got)  # the sink class is not empty
