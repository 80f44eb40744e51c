"""Sharded scans: shards i/n (sample index modulo n, calibrated on the whole data's first samples) merged
with `sinkscope merge` equal the unsharded run, table by table; the shard comes from --shard or from the
launcher's environment (SLURM array, torchrun)."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import ORGANISM_ASSET
from sinkscope.errors import SinkscopeError
from sinkscope.runconfig import parse_shard

TABLES = ("massive_activations", "layer_magnitudes_per_sample", "token_summary_per_sample", "token_stats",
          "sink_tokens", "role_phi_per_sample", "head_scores_per_sample", "dim_profile", "layer_magnitudes",
          "head_scores", "sink_summary", "role_summary", "text_sink_tokens")


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_the_unsharded_scan(n, tmp_path):
    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    common = ["scan", "--model", "organism", "--limit", "5", "--calibration", "3", "--batch-size", "1"]
    runner = CliRunner()
    whole = runner.invoke(app, common + ["--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    for i in range(n):
        done = runner.invoke(app, common + ["--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/{n}"])
        assert done.exit_code == 0, done.output
    merged = runner.invoke(app, ["merge", *[str(tmp_path / f"s{i}") for i in reversed(range(n))],
                                 "--out", str(tmp_path / "merged"), "--no-figures"])
    assert merged.exit_code == 0, merged.output
    for table in TABLES:
        a, b = tmp_path / "whole" / f"{table}.csv", tmp_path / "merged" / f"{table}.csv"
        assert a.exists() == b.exists(), table
        if a.exists():
            pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), obj=table)
    assert (tmp_path / "merged" / "index.md").exists()
    missing = runner.invoke(app, ["merge", str(tmp_path / "s0"), "--out", str(tmp_path / "m2")])
    assert missing.exit_code == 2 and f"0/{n}" in missing.output


def test_the_shard_comes_from_the_flag_or_the_launcher():
    assert parse_shard("1/4", {}) == (1, 4)
    assert parse_shard(None, {}) is None
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (2, 4)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert parse_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert parse_shard("0/2", {"RANK": "1", "WORLD_SIZE": "2"}) == (0, 2)  # the flag wins
    for bad in ("2/2", "a/b", "1", "-1/3"):
        with pytest.raises(SinkscopeError, match="--shard"):
            parse_shard(bad, {})
