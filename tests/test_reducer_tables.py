"""The head and contribution analyses' per-batch tables, built from arrays once per batch, equal the literal build
as their reducers' `take` made it before: one frame per (layer, sample) for heads and image tokens, one per
(layer, map sample, head, query word) for the maps, one per (layer, token class, sample) for contributions. Each
pair of reducers reads the same trace of the organism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sinkscope.analyses.common import prepare_batch
from sinkscope.analyses.contributions import CLASSES, ContributionReducer
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

    def end(self):
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

    def end(self):
        pass


def test_contribution_tables_equal_the_literal_build(organism_adapter):
    adapter = organism_adapter
    truth = json.loads((ASSET / "ground_truth.json").read_text())
    samples = load_samples("demo", 3)
    o_weights = {i: adapter.output_weight(i).detach() for i in range(adapter.num_layers)}

    def make(cls):
        return cls(truth["sink_dims"], 100.0, adapter.rms_norm_eps, "layer", o_weights, adapter.num_heads)

    fast, literal = make(ContributionReducer), make(LiteralContributionReducer)
    Tracer(adapter).run(prepare_batch(adapter, samples), [fast, literal], sample_ids=[s.sample_id for s in samples],
                        values=True)
    expected = pd.concat(literal.rows, ignore_index=True)
    pd.testing.assert_frame_equal(pd.concat(fast.rows, ignore_index=True), expected, check_exact=True)
    assert set(expected["token_class"]) == set(CLASSES) and len(fast.rows) == 1  # sinks, non-sinks, BOS; one frame
