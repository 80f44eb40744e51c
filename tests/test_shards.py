"""Sharded scans: shards i/n (sample index modulo n, calibrated on the whole data's first samples) merged
with `sinkscope merge` equal the unsharded run, table by table; the shard comes from --shard or from the
launcher's environment (SLURM array, torchrun)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import ORGANISM_ASSET
from sinkscope.errors import SinkscopeError
from sinkscope.launcher import parse_shard
from sinkscope.runconfig import sample_seed

TABLES = ("massive_activations", "layer_magnitudes_per_sample", "token_summary_per_sample", "token_stats",
          "sink_tokens", "role_phi_per_sample", "head_scores_per_sample", "dim_profile", "layer_magnitudes",
          "head_scores", "sink_summary", "role_summary", "text_sink_tokens")


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_the_unsharded_scan(n, tmp_path):
    """Two shards: the workers of one torchrun command line, run at once, each taking its shard from RANK / WORLD_SIZE
    and its folder from --out .../{shard}; three: --shard i/n, one after the other."""
    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    common = ["scan", "--model", "organism", "--limit", "5", "--calibration", "3", "--batch-size", "1"]
    runner = CliRunner()
    shards = _run_sharded(runner, app, common, tmp_path, n, torchrun=n == 2)
    for table in TABLES:
        a, b = tmp_path / "whole" / f"{table}.csv", tmp_path / "merged" / f"{table}.csv"
        assert a.exists() == b.exists(), table
        if a.exists():
            pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), obj=table)
    assert (tmp_path / "merged" / "index.md").exists()
    missing = runner.invoke(app, ["merge", str(shards[0]), "--out", str(tmp_path / "m2")])
    assert missing.exit_code == 2 and f"0/{n}" in missing.output


def test_the_shard_comes_from_the_flag_or_the_launcher():
    assert parse_shard("1/4", {}) == (1, 4)
    assert parse_shard(None, {}) is None
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}) == (2, 4)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert parse_shard(None, {"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert parse_shard("0/2", {"RANK": "1", "WORLD_SIZE": "2"}) == (0, 2)  # the flag wins
    # an array of multi-GPU jobs: task 2 of 3, each running worker 1 of 2, does shard 2 * 2 + 1 of 6
    array_of_workers = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3", "RANK": "1", "WORLD_SIZE": "2"}
    assert parse_shard(None, array_of_workers) == (5, 6)
    shards = {parse_shard(None, {**array_of_workers, "SLURM_ARRAY_TASK_ID": str(t), "RANK": str(r)})
              for t in range(3) for r in range(2)}
    assert shards == {(i, 6) for i in range(6)}  # every sample done once
    with pytest.raises(SinkscopeError, match="RANK / WORLD_SIZE give worker 2 of 2"):
        parse_shard(None, {"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(SinkscopeError, match="not integers.*--shard i/n"):
        parse_shard(None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"})
    for bad in ("2/2", "a/b", "1", "-1/3"):
        with pytest.raises(SinkscopeError, match="--shard"):
            parse_shard(bad, {})


def _run_sharded(runner, app, common: list[str], tmp_path, n: int, whole=None, torchrun: bool = False) -> list:
    """The unsharded run in `whole` (tmp_path/whole; kept when it has finished), shards 0..n-1 in tmp_path/s<i>,
    merged (given in reverse) into tmp_path/merged; returns the shards' folders. torchrun: the shards are n workers of one torchrun command line
    (`--out tmp_path/s{shard}`: folders s0-of-n ...), run at once in their own processes."""
    whole = whole or tmp_path / "whole"
    if not (whole / "run.json").exists() or not json.loads((whole / "run.json").read_text()).get("finished"):
        result = runner.invoke(app, common + ["--out", str(whole)])
        assert result.exit_code == 0, result.output
    if torchrun:
        shards = [tmp_path / f"s{i}-of-{n}" for i in range(n)]
        _torchrun(n, common + ["--out", str(tmp_path / "s{shard}")], tmp_path)
        for i, shard in enumerate(shards):
            assert json.loads((shard / "run.json").read_text())["params"]["shard"] == f"{i}/{n}"
    else:
        shards = [tmp_path / f"s{i}" for i in range(n)]
        for i, shard in enumerate(shards):
            done = runner.invoke(app, common + ["--out", str(shard), "--shard", f"{i}/{n}"])
            assert done.exit_code == 0, done.output
    merged = runner.invoke(app, ["merge", *[str(s) for s in reversed(shards)], "--out", str(tmp_path / "merged"),
                                 "--no-figures"])
    assert merged.exit_code == 0, merged.output
    return shards


def _torchrun(n: int, args: list[str], cwd) -> None:
    """`torchrun --standalone --nproc-per-node n --no-python python -m sinkscope.cli ARGS`: n workers on this machine,
    each with its RANK, WORLD_SIZE and LOCAL_RANK."""
    import subprocess
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "--no-python",
              sys.executable, "-m", "sinkscope.cli", *args]
    done = subprocess.run(launch, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for i in range(n):
        assert f"shard {i}/{n}" in done.stdout, done.stdout[-3000:]  # each worker said which samples it took


def _assert_same_tables(tmp_path, tables, whole=None) -> None:
    for table in tables:
        a, b = (whole or tmp_path / "whole") / f"{table}.csv", tmp_path / "merged" / f"{table}.csv"
        assert a.exists() and b.exists(), table
        left, right = pd.read_csv(a), pd.read_csv(b)
        assert len(left), table
        pd.testing.assert_frame_equal(left, right, obj=table, check_exact=True)
    assert (tmp_path / "merged" / "index.md").exists()


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_the_unsharded_ablation(n, tmp_path):
    """Batch size 1: the random control's keys come from (seed, sample index) whatever the batch; batch size 1 only
    keeps padding from changing the forward's last bits between the runs compared."""
    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    common = ["ablate", "--model", "organism", "--limit", "5", "--batch-size", "1", "--n-random", "2",
              "--n-boot", "50"]
    _run_sharded(CliRunner(), app, common, tmp_path, n)
    _assert_same_tables(tmp_path, ("ablation_per_sample", "ablation", "ablation_contrasts"))
    per = pd.read_csv(tmp_path / "merged" / "ablation_per_sample.csv")
    assert (per["condition"] == "random_visual").any()  # the random control ran, and matched across shards


@pytest.mark.parametrize("n", [2, 3])
def test_merged_shards_equal_the_unsharded_var_eval(n, tmp_path):
    """Every shard runs the whole validation sweep, so each chooses the same p and rho; the merge keeps one copy."""

    from sinkscope.cli import app

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    common = ["var-eval", "--model", "organism", "--tasks", "pope-random", "--limit", "4", "--val-limit", "2",
              "--p-grid", "0.3,0.9", "--rho-grid", "0.5", "--captions", "3", "--batch-size", "1", "--n-boot", "50"]
    _run_sharded(CliRunner(), app, common, tmp_path, n)
    _assert_same_tables(tmp_path, ("var_answers", "var_sweep", "var_eval", "var_captions", "chair"))
    chosen = [json.loads((tmp_path / d / "run.json").read_text())["chosen"] for d in ("whole", "merged")]
    assert chosen[0] == chosen[1]
    answers = pd.read_csv(tmp_path / "merged" / "var_answers.csv")
    assert set(answers["phase"]) == {"validation", "test"} and (answers["condition"] == "var_random_heads").any()


def test_a_random_control_draw_depends_on_the_sample_alone():
    import torch

    from sinkscope.analyses.ablate import random_visual_keys
    from sinkscope.runconfig import sample_seed

    visual = torch.tensor([[False, True, True, True, True, False], [False, False, True, True, True, True]])
    gens = lambda: [torch.Generator().manual_seed(sample_seed(0, k)) for k in (7, 8)]  # noqa: E731
    both = random_visual_keys(visual, torch.tensor([2, 3]), gens())
    assert both.sum(1).tolist() == [2, 3] and not (both & ~visual).any()
    alone = random_visual_keys(visual[1:], torch.tensor([3]), gens()[1:])  # the same sample in a batch of its own
    assert torch.equal(alone[0], both[1])
    assert sample_seed(0, 7) != sample_seed(0, 8) and sample_seed(0, 7) == sample_seed(0, 7)


def test_patching_controls_depend_on_the_sample_alone():
    """patch's matched controls with one generator per row: a row's draw is the same alone or in a batch, padded."""
    import torch

    from sinkscope.interventions.patching import matched_heads, matched_tokens

    gens = lambda: [torch.Generator().manual_seed(k) for k in (7, 8)]  # noqa: E731
    pool = torch.tensor([[False, True, True, True, True, True], [True, True, False, True, True, False]])
    both = matched_tokens(torch.tensor([2, 3]), pool, gens())
    assert both.sum(1).tolist() == [2, 3] and not (both & ~pool).any()
    alone = matched_tokens(torch.tensor([3]), pool[1:, :5], gens()[1:])  # unpadded, in a batch of its own
    assert torch.equal(alone[0], both[1, :5])
    chosen = torch.zeros(2, 4, 6, dtype=torch.bool)
    chosen[0, :2, 1], chosen[1, :1, 3] = True, True
    eligible = torch.zeros_like(chosen)
    eligible[0, :, 1:], eligible[1, :, :5] = True, True  # row 0 left-padded by one token
    other = matched_heads(chosen, eligible, gens())
    assert not (other & chosen).any() and other[0, :, 1].sum() == 2 and other[1, :, 3].sum() == 1
    alone = matched_heads(chosen[1:, :, :5], eligible[1:, :, :5], gens()[1:])
    assert torch.equal(alone[0], other[1, :, :5])


@pytest.mark.parametrize("command", ["ablate", "var-eval"])
@pytest.mark.parametrize("bad,words", [("3/3", "0 <= i < n"), ("one/2", "give i/n")])
def test_a_bad_shard_names_the_fix(command, bad, words, tmp_path):
    from sinkscope.cli import app

    result = CliRunner().invoke(app, [command, "--model", "organism", "--out", str(tmp_path / "x"), "--shard", bad])
    assert result.exit_code == 2, result.output
    assert "--shard" in result.output and words in result.output and "0/4" in result.output


BY_SAMPLE_RUNS = {  # command -> (its own options, the tables compared)
    "heads": ([], ("head_scores_per_sample", "token_attention", "attention_maps", "head_scores",
                   "phi_attention_correlation", "map_overlap")),
    "contributions": ([], ("contributions_per_sample", "contributions", "contribution_heads")),
    "location": ([], ("location_per_sample", "location")),
    "vit-sinks": (["--norm-ratio", "1.5"], ("vit_tokens", "vit_sinks", "vit_dims")),
    "patch": (["--layers", "2"], ("patching_per_sample", "patching")),
    "remove": (["--data", "demo:pope-adversarial", "--targets", "first,visual_sinks", "--to", "zero,chosen_mean"],
               ("remove_per_sample", "remove_attention_per_sample", "remove", "remove_attention")),
}


@pytest.mark.parametrize("command", sorted(BY_SAMPLE_RUNS))
def test_merged_shards_equal_the_unsharded_run_sample_by_sample(command, tmp_path):
    """heads, contributions, location, vit-sinks (read only), patch (random controls drawn per sample) and remove (no
    random draw): 2 and 3 shards merged equal the unsharded run, every table (per-sample and summary) exactly; batch
    size 1 keeps padding out of the forward's last bits."""
    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    options, tables = BY_SAMPLE_RUNS[command]
    common = [command, "--model", "organism", "--limit", "5", "--calibration", "3", "--batch-size", "1",
              "--n-boot", "50", *options]
    _assert_2_and_3_shards_merge_equal(common, tables, ("tau", "sink_dims", "n_samples", "signature", "chosen_means"),
                                       tmp_path)


def _assert_2_and_3_shards_merge_equal(common: list[str], tables, keys, tmp_path) -> None:
    """Run `common` whole, then as 2 and as 3 shards merged: every table and run.json's params and `keys` equal."""
    from sinkscope.cli import app

    runner = CliRunner()
    for n in (2, 3):
        _run_sharded(runner, app, common, tmp_path / str(n), n, whole=tmp_path / "whole")
        _assert_same_tables(tmp_path / str(n), tables, whole=tmp_path / "whole")
        merged, whole = (json.loads((folder / "run.json").read_text()) for folder in (tmp_path / str(n) / "merged",
                                                                                    tmp_path / "whole"))
        assert merged["params"] == whole["params"] and merged["finished"]
        assert {k: merged.get(k) for k in keys} == {k: whole.get(k) for k in keys}


INJECT_TABLES = ("inject_per_sample", "inject_heads_per_sample", "inject_answers_per_sample", "inject_var_per_sample",
                 "inject", "inject_heads", "inject_sink_scales", "inject_var")


def test_merged_shards_equal_the_unsharded_inject(tmp_path):
    """inject's token draws come from a generator per sample (seeded by its index in the data) and its control dims
    from the seed alone, drawn before the samples: 2 and 3 shards merged equal the unsharded run, every table
    (per-sample and summary) exactly, with the same injection layer and control dims in run.json; batch size 1 keeps
    padding out of the forward's last bits."""
    from sinkscope.cli import SHARDED

    if not (ORGANISM_ASSET / "config.json").exists():
        pytest.skip("the organism asset is not built")
    assert all(c in SHARDED for c in (*BY_SAMPLE_RUNS, "inject"))
    common = ["inject", "--model", "organism", "--limit", "5", "--calibration", "3", "--batch-size", "1",
              "--n-boot", "50", "--scales", "0.1,1", "--n-seeds", "2"]
    _assert_2_and_3_shards_merge_equal(common, INJECT_TABLES, ("tau", "sink_dims", "n_samples", "signature",
                                                               "control_dims"), tmp_path)
    per = pd.read_csv(tmp_path / "whole" / "inject_per_sample.csv")
    assert {"inject", "random_dim", "rescale", "none"} <= set(per["treatment"]) and per["sample"].nunique() == 5
    assert set(pd.read_csv(tmp_path / "whole" / "inject_var_per_sample.csv")["condition"]) == {
        "none", "var", "inject", "inject+var"}
    dims = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert len(dims["control_dims"]) == 3 * 2 and not set(dims["control_dims"].values()) & set(dims["sink_dims"])


def test_inject_draws_depend_on_the_sample_alone():
    """A row's tokens drawn with its own generator are the same alone (unpadded) or in a padded batch; the control
    dims depend on the seed and the sink dims only (never a sink dim)."""
    import torch

    from sinkscope.analyses.inject import InjectConfig, draw_control_dims, draw_tokens
    from sinkscope.interventions.sink_signature import SinkSignature

    gens = lambda: [torch.Generator().manual_seed(sample_seed(0, k, "text", 0)) for k in (7, 8)]  # noqa: E731
    pool = torch.tensor([[False, True, True, True, True, True], [False, False, True, True, False, True]])
    both, ok = draw_tokens(pool, 2, gens())
    assert ok.tolist() == [True, True] and both.sum(1).tolist() == [2, 2] and not (both & ~pool).any()
    alone, _ = draw_tokens(pool[1:, 2:], 2, gens()[1:])  # the second sample unpadded, in a batch of its own
    assert torch.equal(alone[0], both[1, 2:])
    few, ok = draw_tokens(pool, 5, gens())  # too few eligible tokens: an empty mask, never a smaller set
    assert ok.tolist() == [True, False] and few[1].sum() == 0 and few[0].sum() == 5
    sig = SinkSignature((1, 90), 2)
    cfg = InjectConfig(groups=["text", "object"], n_seeds=3)
    first = draw_control_dims(cfg, 128, sig)
    assert first == draw_control_dims(cfg, 128, sig) and sorted(first) == sorted(
        (g, s) for g in ("text", "object") for s in range(3))
    assert not set(first.values()) & {1, 90} and all(0 <= d < 128 for d in first.values())
    other = draw_control_dims(InjectConfig(groups=["text", "object"], n_seeds=3, seed=1), 128, sig)
    assert other != first
