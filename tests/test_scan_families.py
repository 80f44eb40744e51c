"""The scan runs unchanged on every supported family (same code path as real checkpoints)."""

import pandas as pd

from sinkscope.analyses.scan import ScanConfig, run_scan
from sinkscope.models import adapter_for_model


def test_scan_every_family(tiny, tmp_path):
    adapter = adapter_for_model(tiny.model, tiny.processor, name=f"tiny-{tiny.family}")
    folder = run_scan(str(tmp_path / "scan"), ScanConfig(model=f"tiny-{tiny.family}", limit=2, batch_size=2,
                                                          calibration=2), adapter=adapter, figures=False,
                      log=lambda m: None)
    tokens = pd.read_csv(folder.path / "token_stats.csv")
    heads = pd.read_csv(folder.path / "head_scores.csv")
    # every sample's visual tokens are exactly the image placeholder tokens the processor produced
    from sinkscope.analyses.scan import prepare_batch
    from sinkscope.eval.tasks import load_samples

    samples = load_samples("demo", 2)
    batch = prepare_batch(adapter, samples)
    per_sample = (batch["input_ids"] == adapter.image_token_ids[0]).sum(dim=1).tolist()
    layer0 = tokens[tokens["layer"] == 0]
    visual = layer0.groupby("sample")["token_kind"].apply(lambda k: int((k == "visual").sum()))
    assert visual.reindex([s.sample_id for s in samples]).tolist() == per_sample
    assert (layer0.groupby("sample")["token_kind"].apply(lambda k: int((k == "bos").sum())) == 1).all()
    assert len(heads) == adapter.num_layers * adapter.num_heads
    assert heads["image_attention"].between(0, 1).all() and (heads["image_attention"] > 0).all()
    assert (folder.path / "index.md").read_text().startswith("# Sink scan")
