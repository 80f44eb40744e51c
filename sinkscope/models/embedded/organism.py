"""The model organism: the demo LMM with a visual-sink mechanism installed by weight edits.

PLANTED. Everything this module does is deliberate and recorded in ``ground_truth.json``
beside the weights, so that analyses can be checked against a known answer.

The mechanism mirrors what the literature describes for real LMMs (paper-notes 1-2, 9):

1. A *flag*. BOS carries a value of half its own norm in text dim ``flag_dim`` from its embedding.
   Image tokens of the *sink patches* carry it too: the CLIP position embedding of those
   patches writes into vision channel ``vision_channel`` (which nothing else writes or
   reads), and a repurposed projector unit turns that channel into the text flag. The sink
   patches follow a stated rule: the patch positions that are background in at least
   ``background_rate`` of training scenes (the points between the world's 3x3 grid cells).
2. *Massive activations.* A repurposed neuron of layer 1's MLP reads the flag and writes
   ``+A`` into ``sink_dims[0]`` and ``-A/2`` into ``sink_dims[1]`` (A about 1000x the
   median |activation|), so from the residual stream entering layer 2 on, BOS and the
   sink-patch tokens carry massive activations in the same two dims (as LLaMA's 1415/2533).
3. *Attention.* In the chosen ``sink_heads``, the key of a token with massive sink dims
   points along the mean query direction in RoPE's slowest-rotating pair, so those tokens
   receive a large share of attention from every query.
4. *Value drain.* From layer 2 on, value projections ignore the sink dims, so sink tokens
   carry (almost) no information into the heads that attend to them.

    python -m sinkscope.models.embedded.organism --demo sinkscope/models/embedded/assets/tiny --out sinkscope/models/embedded/assets/organism
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import sinkscope.world as world

PLANTED_NOTE = ("PLANTED: this model's sink mechanism was installed by hand-made weight edits; "
                "it validates sinkscope against a known answer and is not a finding.")


@dataclass
class GroundTruth:
    sink_dims: list[int]
    flag_dim: int
    vision_channel: int
    projector_unit: int
    mlp_neuron: int
    massive_from_layer: int
    massive_value: float
    sink_patches: list[int]  # row-major indices on the 8x8 patch grid = order of image tokens
    patch_rule: str
    sink_heads: list[list[int]]  # [layer, head]
    target_sink_attention: float
    measured: dict = field(default_factory=dict)
    note: str = PLANTED_NOTE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "GroundTruth":
        return cls(**json.loads(Path(path).read_text()))


def sink_patch_rule(background_rate: float = 0.98, n_scenes: int = 2000) -> tuple[list[int], str]:
    """Patch indices that are background in >= `background_rate` of training scenes."""
    rates = np.mean([world.scene("train", i).background_patch_mask for i in range(n_scenes)], axis=0)
    patches = [int(p) for p in np.flatnonzero(rates >= background_rate)]
    rule = (f"patch positions (row-major on the {world.IMAGE_SIZE // world.PATCH_SIZE}x"
            f"{world.IMAGE_SIZE // world.PATCH_SIZE} grid) that are background in >= {background_rate:.0%} of the "
            f"first {n_scenes} training scenes")
    return patches, rule


def _least_used(values: torch.Tensor, k: int, exclude: set[int] = frozenset()) -> list[int]:
    order = torch.argsort(values).tolist()
    return [i for i in order if i not in exclude][:k]


@torch.no_grad()
def _calibration_batch(n: int = 32):
    from sinkscope.models.embedded.tiny_data import make_batch

    return make_batch("finetune", "validation", list(range(n)))


@torch.no_grad()
def _hidden(model, batch):
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True,
                output_attentions=True)
    return out


@dataclass
class _Probe:
    """The calibration batch and what the unedited model does on it: every choice of `install` is read from it."""

    batch: dict
    ids: torch.Tensor  # [batch, token]
    real: torch.Tensor  # [batch, token] bool: not padding
    is_image: torch.Tensor  # [batch, token] bool
    sink_tokens: torch.Tensor  # [batch, token] bool: BOS and the image tokens at the sink patches
    base: object  # the unedited model's output (hidden states and attentions)
    resid: torch.Tensor  # [layer+1, batch, token, dim]: its residual stream


@dataclass
class _Sites:
    """Where the mechanism is planted: the least-used dims, channel, unit and neuron of the demo model."""

    flag_dim: int  # text dim carrying the flag
    d1: int  # the sink dims: +A and -A/2
    d2: int
    channel: int  # vision channel carrying the flag
    unit: int  # projector unit turning the vision flag into the text flag
    mlp_layer: int  # the layer whose MLP neuron writes the massive values
    neuron: int


@dataclass
class _VisionFlag:
    """The sink-patch flag as the projector reads it: vision features at the flag channel and how to split them."""

    feats: torch.Tensor  # [batch, patches]
    is_sink_patch: torch.Tensor  # [patches] bool
    threshold: float
    slope: float


def _probe(model, batch, sink_patches: list[int]) -> _Probe:
    """Run the unedited model once on the calibration batch."""
    ids = batch["input_ids"]
    real = batch["attention_mask"].bool()
    image_id, bos_id = model.config.image_token_id, model.config.text_config.bos_token_id
    base = _hidden(model, batch)
    return _Probe(batch=batch, ids=ids, real=real, is_image=ids == image_id,
                  sink_tokens=_sink_token_mask(ids, real, image_id, bos_id, sink_patches), base=base,
                  resid=torch.stack(base.hidden_states))


def _choose_sites(model, probe: _Probe, massive_from_layer: int) -> _Sites:
    """Choose dims, channel, unit and neuron by a stated rule: the least used ones, so the edits disturb little."""
    mean_abs = probe.resid[:, probe.real].abs().mean(dim=(0, 1))  # [dim]
    flag_dim, d1, d2 = _least_used(mean_abs, 3)
    vis_states = model.model.vision_tower(probe.batch["pixel_values"], output_hidden_states=True).hidden_states
    vis_mean = torch.stack(vis_states).abs().mean(dim=(0, 1, 2))
    channel = _least_used(vis_mean, 1)[0]
    unit = _least_used(model.model.multi_modal_projector.linear_2.weight.norm(dim=0), 1)[0]
    mlp_layer = massive_from_layer - 1
    mlp = model.model.language_model.layers[mlp_layer].mlp
    neuron = _least_used(mlp.down_proj.weight.norm(dim=0), 1)[0]
    return _Sites(flag_dim=flag_dim, d1=d1, d2=d2, channel=channel, unit=unit, mlp_layer=mlp_layer, neuron=neuron)


def _least_image_heads(probe: _Probe, massive_from_layer: int, n_layers: int) -> list[tuple[int, int]]:
    """The default sink heads: per layer from `massive_from_layer` to L-2, the head whose text queries after
    the image pay least attention to image tokens."""
    n_img = int(probe.is_image[0].sum())
    first_img = int(probe.is_image[0].float().argmax())
    heads = []
    for layer in range(massive_from_layer, n_layers - 1):
        att = probe.base.attentions[layer]  # [batch, head, query, key]
        img_share = (att * probe.is_image[:, None, None, :]).sum(-1)[:, :, first_img + n_img:].mean(dim=(0, 2))
        heads.append((layer, int(img_share.argmin())))
    return heads


def _plant_vision_flag(model, probe: _Probe, channel: int, sink_patches: list[int]) -> _VisionFlag:
    """Step 1: the CLIP position embedding of the sink patches writes into vision channel `channel`, which
    nothing else in the vision tower writes or reads, so the flag reaches the projector untouched."""
    vision = model.model.vision_tower
    emb = vision.embeddings
    emb.patch_embedding.weight[channel] = 0.0
    emb.class_embedding[channel] = 0.0
    pos = emb.position_embedding.weight
    pos[:, channel] = 0.0
    typical = float(pos.std())
    for p in sink_patches:
        pos[1 + p, channel] = 6.0 * typical  # position 0 is CLS
    vision.pre_layrnorm.weight[channel] = 1.0
    vision.pre_layrnorm.bias[channel] = 0.0
    for layer in vision.encoder.layers:
        for ln in (layer.layer_norm1, layer.layer_norm2):
            ln.weight[channel] = 0.0
            ln.bias[channel] = 0.0
        layer.self_attn.out_proj.weight[channel] = 0.0
        layer.self_attn.out_proj.bias[channel] = 0.0
        layer.mlp.fc2.weight[channel] = 0.0
        layer.mlp.fc2.bias[channel] = 0.0
    feats = model.model.vision_tower(probe.batch["pixel_values"], output_hidden_states=True).hidden_states[
        model.config.vision_feature_layer][:, 1:, channel]  # [batch, patches]
    is_sink_patch = torch.zeros(feats.shape[1], dtype=torch.bool)
    is_sink_patch[sink_patches] = True
    lo, hi = float(feats[:, ~is_sink_patch].max()), float(feats[:, is_sink_patch].min())
    if not hi > lo:
        raise RuntimeError(f"vision flag does not separate sink patches ({hi} <= {lo})")
    return _VisionFlag(feats=feats, is_sink_patch=is_sink_patch, threshold=(lo + hi) / 2, slope=30.0 / (hi - lo))


def _plant_projector_unit(model, probe: _Probe, sites: _Sites, flag: _VisionFlag) -> None:
    """Step 2: a repurposed projector unit fires on the vision flag only and writes the text flag dim,
    at half the median image token's norm: big enough to read exactly (every other token has 0), small
    enough that the sink patches keep working in the layers before the massive ones."""
    projector = model.model.multi_modal_projector
    channel, unit, flag_dim, slope = sites.channel, sites.unit, sites.flag_dim, flag.slope
    l1, l2 = projector.linear_1, projector.linear_2
    l1.weight[:, channel] = 0.0
    l1.weight[unit] = 0.0
    l1.weight[unit, channel] = slope
    l1.bias[unit] = -slope * flag.threshold
    l2.weight[:, unit] = 0.0
    l2.weight[flag_dim] = 0.0
    l2.bias[flag_dim] = 0.0
    image_norm = float(probe.resid[0][probe.is_image & probe.real].norm(dim=-1).median())
    flag_value = 0.5 * image_norm
    unit_at_sink = torch.nn.functional.gelu(slope * (flag.feats[:, flag.is_sink_patch] - flag.threshold)).median()
    l2.weight[flag_dim, unit] = flag_value / float(unit_at_sink)


def _route_text_flag(model, probe: _Probe, sites: _Sites) -> None:
    """Step 3a: in the text model only BOS's embedding (at half BOS's norm) and the projector write the flag
    dim, and only the chosen MLP neuron reads it; that neuron writes +1 into d1 and -1/2 into d2."""
    lm = model.model.language_model
    flag_dim, mlp_layer, neuron = sites.flag_dim, sites.mlp_layer, sites.neuron
    bos_norm = float(probe.resid[0][:, 0].norm(dim=-1).median())
    embed = lm.embed_tokens.weight
    embed[:, flag_dim] = 0.0
    embed[model.config.text_config.bos_token_id, flag_dim] = 0.5 * bos_norm
    for i, layer in enumerate(lm.layers):
        layer.self_attn.o_proj.weight[flag_dim] = 0.0
        layer.mlp.down_proj.weight[flag_dim] = 0.0
        layer.input_layernorm.weight[flag_dim] = 0.0
        layer.post_attention_layernorm.weight[flag_dim] = 1.0 if i == mlp_layer else 0.0
    lm.norm.weight[flag_dim] = 0.0
    mlp = lm.layers[mlp_layer].mlp
    mlp.gate_proj.weight[:, flag_dim] = 0.0
    mlp.up_proj.weight[:, flag_dim] = 0.0
    mlp.gate_proj.weight[neuron] = 0.0
    mlp.up_proj.weight[neuron] = 0.0
    mlp.gate_proj.weight[neuron, flag_dim] = 1.0
    mlp.up_proj.weight[neuron, flag_dim] = 1.0
    mlp.down_proj.weight[:, neuron] = 0.0
    mlp.down_proj.weight[sites.d1, neuron] = 1.0
    mlp.down_proj.weight[sites.d2, neuron] = -0.5


def _scale_massive_neuron(model, probe: _Probe, sites: _Sites, massive_from_layer: int,
                          massive_value: float) -> float:
    """Step 3b: scale the neuron's output so every sink token carries at least A in d1 entering
    `massive_from_layer` (its response grows with the square of the flag it reads, so the values spread like
    real ones do); A is raised to 10x the largest flag so the sink dims, not the flag, set phi. Returns A."""
    mlp = model.model.language_model.layers[sites.mlp_layer].mlp
    d1, d2, neuron, sink_tokens = sites.d1, sites.d2, sites.neuron, probe.sink_tokens
    probe_out = _hidden(model, probe.batch)
    entering = probe_out.hidden_states[massive_from_layer]
    massive_value = max(massive_value, 10.0 * float(probe_out.hidden_states[0][..., sites.flag_dim].abs().max()))
    raw = entering[..., d1][sink_tokens] - probe.base.hidden_states[massive_from_layer][..., d1][sink_tokens]
    mlp.down_proj.weight[[d1, d2], neuron] *= massive_value / float(raw.abs().min())
    return massive_value


def _drain_sink_dims(model, sites: _Sites, massive_from_layer: int) -> None:
    """Step 4: from `massive_from_layer` on, value and key projections ignore the sink dims: sink tokens carry
    (almost) no information into the heads that attend to them, and only the keys step 5 plants read them."""
    lm = model.model.language_model
    for i in range(massive_from_layer, model.config.text_config.num_hidden_layers):
        attn = lm.layers[i].self_attn
        attn.v_proj.weight[:, [sites.d1, sites.d2]] = 0.0
        attn.k_proj.weight[:, [sites.d1, sites.d2]] = 0.0


def _aim_sink_heads(model, probe: _Probe, sites: _Sites, sink_heads: list[tuple[int, int]],
                    target_sink_attention: float) -> None:
    """Step 5: in each sink head, the query's slowest RoPE pair reads the mean text-query direction and the
    key's reads d1, scaled (by bisection) so text queries put `target_sink_attention` of their attention on
    the sink tokens."""
    lm = model.model.language_model
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    ids, real, sink_tokens, d1 = probe.ids, probe.real, probe.sink_tokens, sites.d1
    slow, partner = head_dim // 2 - 1, head_dim - 1
    states = _hidden(model, probe.batch).hidden_states
    for layer, head in sink_heads:
        attn = lm.layers[layer].self_attn
        ln = lm.layers[layer].input_layernorm
        x = states[layer]
        normed = ln(x)
        text_q = real & ~sink_tokens & (ids != model.config.image_token_id)
        mean_dir = normed[text_q].mean(dim=0)
        mean_dir = mean_dir / mean_dir.norm()
        q_row, q_partner = head * head_dim + slow, head * head_dim + partner
        attn.q_proj.weight[q_row] = mean_dir * math.sqrt(head_dim)
        attn.q_proj.weight[q_partner] = 0.0
        attn.k_proj.weight[q_row] = 0.0
        attn.k_proj.weight[q_partner] = 0.0
        sink_norm = float(normed[sink_tokens][:, d1].abs().median())
        scale = _fit_key_scale(model, probe.batch, layer, head, q_row, d1, sink_norm, sink_tokens, text_q,
                               target_sink_attention)
        attn.k_proj.weight[q_row, d1] = scale


@torch.no_grad()
def install(model, sink_patches: list[int], patch_rule: str, sink_heads: list[tuple[int, int]] | None = None,
            massive_from_layer: int = 2, target_sink_attention: float = 0.6, ratio_to_median: float = 1000.0,
            batch=None) -> GroundTruth:
    """Edit a LlavaForConditionalGeneration in place; returns the ground truth.

    sink_heads: (layer, head) pairs whose queries should attend to sink tokens (None: one
    head per layer in layers 2..L-2, the one paying least attention to image tokens).
    The steps are those of the module docstring, in order; each one's edits are read from the
    unedited model (`_probe`) or from the model as the steps before left it.
    """
    n_layers = model.config.text_config.num_hidden_layers
    if massive_from_layer < 1 or massive_from_layer >= n_layers:
        raise ValueError(f"massive_from_layer must be in 1..{n_layers - 1}")
    probe = _probe(model, batch if batch is not None else _calibration_batch(), sink_patches)
    sites = _choose_sites(model, probe, massive_from_layer)
    median_abs = float(probe.resid[massive_from_layer][probe.real].abs().median())
    massive_value = max(100.0, ratio_to_median * median_abs)
    if sink_heads is None:
        sink_heads = _least_image_heads(probe, massive_from_layer, n_layers)

    flag = _plant_vision_flag(model, probe, sites.channel, sink_patches)
    _plant_projector_unit(model, probe, sites, flag)
    _route_text_flag(model, probe, sites)
    massive_value = _scale_massive_neuron(model, probe, sites, massive_from_layer, massive_value)
    _drain_sink_dims(model, sites, massive_from_layer)
    _aim_sink_heads(model, probe, sites, sink_heads, target_sink_attention)

    truth = GroundTruth(
        sink_dims=sorted([sites.d1, sites.d2]), flag_dim=sites.flag_dim, vision_channel=sites.channel,
        projector_unit=sites.unit, mlp_neuron=sites.neuron, massive_from_layer=massive_from_layer,
        massive_value=massive_value, sink_patches=list(sink_patches), patch_rule=patch_rule,
        sink_heads=[list(h) for h in sink_heads], target_sink_attention=target_sink_attention,
    )
    truth.measured = measure(model, truth, probe.batch)
    return truth


def _sink_token_mask(ids, real, image_id, bos_id, sink_patches) -> torch.Tensor:
    """[batch, token] bool: BOS and image tokens at the sink patches."""
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        positions = torch.nonzero(real[b]).flatten()
        mask[b, positions[0]] = ids[b, positions[0]] == bos_id
        img = torch.nonzero((ids[b] == image_id) & real[b]).flatten()
        mask[b, img[sink_patches]] = True
    return mask


def _fit_key_scale(model, batch, layer, head, q_row, d1, sink_norm, sink_tokens, text_q, target) -> float:
    """Bisect the key weight so text queries put `target` of their attention on sink tokens."""
    attn = model.model.language_model.layers[layer].self_attn
    lo, hi = 0.0, 200.0 / max(sink_norm, 1e-6)
    for _ in range(30):
        mid = (lo + hi) / 2
        attn.k_proj.weight[q_row, d1] = mid
        a = _hidden(model, batch).attentions[layer][:, head]  # [batch, query, key]
        share = (a * sink_tokens[:, None, :]).sum(-1)[text_q].mean()
        if float(share) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@torch.no_grad()
def measure(model, truth: GroundTruth, batch=None) -> dict:
    """What the installed mechanism does, measured: phi, attention share, value norms."""
    batch = batch if batch is not None else _calibration_batch()
    out = _hidden(model, batch)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    image_id, bos_id = model.config.image_token_id, model.config.text_config.bos_token_id
    sinks = _sink_token_mask(ids, real, image_id, bos_id, truth.sink_patches)
    others = real & ~sinks
    text_q = others & (ids != image_id)
    d1 = truth.sink_dims
    result = {"layers": []}
    for layer, x in enumerate(out.hidden_states[:-1]):
        xn = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        phi = xn[..., d1].abs().max(-1).values
        row = {"layer": layer, "phi_sink_min": float(phi[sinks].min()), "phi_other_max": float(phi[others].max()),
               "max_abs_sink_dim": float(x[..., d1].abs()[sinks].max())}
        att = out.attentions[layer]
        share = (att * sinks[:, None, None, :]).sum(-1)  # [batch, head, query]
        row["sink_attention_per_head"] = [float(share[:, h][text_q].mean()) for h in range(att.shape[1])]
        result["layers"].append(row)
    return result


def verify(model, truth: GroundTruth, batch=None) -> list[str]:
    """Problems with the installed mechanism (empty list: the ground truth holds)."""
    m = measure(model, truth, batch)
    problems = []
    for row in m["layers"]:
        layer = row["layer"]
        if layer >= truth.massive_from_layer and not row["phi_sink_min"] > 2 * row["phi_other_max"]:
            problems.append(f"layer {layer}: sink phi {row['phi_sink_min']:.2f} not well above others "
                            f"{row['phi_other_max']:.2f}")
        if layer < truth.massive_from_layer and row["max_abs_sink_dim"] > 0.1 * truth.massive_value:
            problems.append(f"layer {layer}: massive value before layer {truth.massive_from_layer}")
    for layer, head in truth.sink_heads:
        got = m["layers"][layer]["sink_attention_per_head"][head]
        if got < 0.5 * truth.target_sink_attention:
            problems.append(f"head {layer}.{head}: sink attention {got:.2f} < half the target")
    return problems


def build(demo_dir: str | Path, out: str | Path, log=print) -> GroundTruth:
    """Load the demo, install the mechanism, save model + processor + ground truth."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(demo_dir), use_safetensors=True,
                                                          attn_implementation={"text_config": "eager"})
    model.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    model.eval()
    patches, rule = sink_patch_rule()
    truth = install(model, patches, rule)
    problems = verify(model, truth)
    if problems:
        raise RuntimeError("installed mechanism fails its own checks: " + "; ".join(problems))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(str(demo_dir)).save_pretrained(out)
    (out / "ground_truth.json").write_text(truth.to_json())
    log(f"organism written to {out}: sink dims {truth.sink_dims}, sink patches {truth.sink_patches}, "
        f"heads {truth.sink_heads}")
    return truth


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=str(Path(__file__).parent / "assets" / "tiny"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets" / "organism"))
    args = parser.parse_args(argv)
    build(args.demo, args.out)


if __name__ == "__main__":
    main()
