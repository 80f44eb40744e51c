"""Run folders: per-sample rows written by Arrow's CSV writer read back as pandas' own writer's rows do; one process
writes a folder at a time."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest

from sinkscope.runfolder import RunFolder, arrow_csv


def _frame(n: int, seed: int) -> pd.DataFrame:
    """Every column kind the run folders hold, with the values CSV text gets wrong most easily."""
    rng = np.random.default_rng(seed)
    scales = rng.choice([1e-30, 1e-7, 1e-3, 1.0, 7.0, 2500.0, 1e12, 1e30], n)
    f64 = rng.standard_normal(n) * scales
    f64[:6] = [np.nan, np.inf, -np.inf, -0.0, 5e-324, 0.1 + 0.2][: min(6, n)]
    f32 = (rng.standard_normal(n) * scales).astype(np.float32)
    f32[:4] = np.array([np.nan, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)[: min(4, n)]
    texts = np.array(["s,1", 'say "no"', "line\nbreak", "", "NA", "ünï", " padded ", "plain", "-1", "True"],
                     dtype=object)
    text = texts[rng.integers(0, len(texts), n)]
    text[::7] = None
    flags = np.array(rng.choice([True, False, None], n), dtype=object)
    return pd.DataFrame({
        "sample": [f"s{i % 3}" for i in range(n)], "layer": rng.integers(-3, 40, n),
        "big": rng.integers(-2**62, 2**62, n), "f64": f64, "f32": f32, "is_sink": rng.random(n) < 0.3,
        "token": pd.array(text, dtype="str"), "token_object": text, "on_background": flags,
        "all_none": np.full(n, None, dtype=object),
    })


def _read(source) -> pd.DataFrame:
    """pandas' reader, exact for floats: pandas 3's default; before it, its default parser misreads the last bit
    of ~30% of float64 texts whichever writer wrote them (pandas 2.0: 68.5% of `_frame`'s float64 read back
    exactly from pandas' own text), so those versions read with `float_precision="round_trip"`."""
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    return pd.read_csv(source, dtype={"sample": str}, **exact)


def _through_pandas(frame: pd.DataFrame) -> pd.DataFrame:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    return _read(io.StringIO(buf.getvalue()))


@pytest.mark.parametrize("seed", range(4))
def test_arrow_rows_read_back_as_pandas_rows(seed, tmp_path):
    frame = _frame(200, seed)
    assert arrow_csv(frame, header=True) is not None  # the fast path is the one taken
    folder = RunFolder(tmp_path / "run", "scan", {}, resume=False)
    folder.append_rows("t", frame.iloc[:120])
    folder.append_rows("t", frame.iloc[120:])
    got = _read(tmp_path / "run" / "t.csv")
    pd.testing.assert_frame_equal(got, _through_pandas(frame), check_exact=True)


def test_rows_appended_by_either_writer_read_back_as_one_table(tmp_path):
    """A run resumed by this version after an older one wrote its first rows with pandas."""
    frame = _frame(60, 9)
    path = tmp_path / "run" / "t.csv"
    folder = RunFolder(tmp_path / "run", "scan", {}, resume=False)
    frame.iloc[:30].to_csv(path, index=False)
    folder.append_rows("t", frame.iloc[30:])
    got = _read(path)
    pd.testing.assert_frame_equal(got, _through_pandas(frame), check_exact=True)


@pytest.mark.parametrize("column", [
    pd.Series([1, "a", 2.5], dtype=object),                      # mixed objects: Arrow cannot type them
    pd.Series(pd.to_datetime(["2026-01-01", "2026-01-02", None])),  # Arrow writes another date format
    pd.Series(pd.Categorical(["a", "b", "a"])),
])
def test_columns_arrow_would_write_differently_go_to_pandas(column, tmp_path):
    frame = pd.DataFrame({"sample": ["a", "b", "c"], "value": column})
    assert arrow_csv(frame, header=True) is None
    folder = RunFolder(tmp_path / "run", "scan", {}, resume=False)
    folder.append_rows("t", frame)
    got = _read(tmp_path / "run" / "t.csv")
    pd.testing.assert_frame_equal(got, _through_pandas(frame), check_exact=True)


def test_a_frame_without_rows_writes_its_header_once(tmp_path):
    folder = RunFolder(tmp_path / "run", "scan", {}, resume=False)
    empty = pd.DataFrame({"sample": pd.Series([], dtype=str), "phi": pd.Series([], dtype=np.float32)})
    folder.append_rows("t", empty)
    folder.append_rows("t", empty)
    folder.append_rows("t", pd.DataFrame({"sample": ["a"], "phi": np.array([1.5], dtype=np.float32)}))
    got = _read(tmp_path / "run" / "t.csv")
    assert list(got.columns) == ["sample", "phi"] and got["phi"].tolist() == [1.5]


def test_half_precision_columns_read_back_to_their_values(tmp_path):
    """float16 reads back to the same float16 values. Older Arrow writers cannot format it (pandas writes it
    then); pandas writes the shortest text that is the same float16 (65504 as 65500.0), Arrow the exact value."""
    values = np.array([1.5, 2.25, 65504, -0.0001], dtype=np.float16)
    frame = pd.DataFrame({"sample": ["a", "b", "c", "d"], "h": values})
    folder = RunFolder(tmp_path / "run", "scan", {}, resume=False)
    folder.append_rows("t", frame)
    got = _read(tmp_path / "run" / "t.csv")
    assert got["h"].to_numpy().astype(np.float16).tobytes() == values.tobytes()
    assert got["sample"].tolist() == ["a", "b", "c", "d"]


_HOLD = """
import sys, time
from sinkscope.runfolder import RunFolder
folder = RunFolder(sys.argv[1], "scan", {"shard": None})
folder.append_rows("token_stats", __import__("pandas").DataFrame({"sample": ["a"], "phi": [1.0]}))
folder.mark_done(["a"])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "finish":
    folder.finish()
    print("finished", flush=True)
    time.sleep(60)
"""


def _holder(path, seconds: float, then: str):
    """A process holding `path` open as a RunFolder (`then` = finish: it finishes after `seconds`, then lingers)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(seconds), then], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_process_cannot_write_a_folder_another_is_writing(tmp_path):
    """Workers started by one command line with one --out would mix their rows in it: the second is refused, naming
    the first (pid, command) and the fix, and the folder is left as the first wrote it. The lock is the system's: it
    goes with its process, killed or not, and the run then resumes; a finished run lets go of it at once."""
    import signal

    from sinkscope.errors import SinkscopeError
    from sinkscope.runfolder import LOCK_NAME, check_not_in_use, check_resumable

    path = tmp_path / "run"
    proc = _holder(path, 120, "hold")
    try:
        before = (path / "token_stats.csv").read_bytes()
        for attempt in (lambda: RunFolder(path, "scan", {"shard": None}),
                        lambda: RunFolder(path, "scan", {"shard": None}, resume=False),  # nor would it start over
                        lambda: check_not_in_use(path),
                        lambda: check_resumable(path, "scan", {"shard": None})):  # what commands check before loading
            with pytest.raises(SinkscopeError, match=rf"being written by another process \(pid {proc.pid} on "
                                                     r".*--out 'runs/NAME/\{shard\}'"):
                attempt()
        assert (path / "token_stats.csv").read_bytes() == before and (path / "samples_done.txt").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up of its own: the system drops its lock
        proc.wait()
    folder = RunFolder(path, "scan", {"shard": None})  # resumes what the killed process finished
    assert folder.done_samples() == {"a"} and (path / LOCK_NAME).is_file()
    folder.finish()

    proc = _holder(tmp_path / "other", 0, "finish")
    try:
        assert proc.stdout.readline().strip() == "finished"
        RunFolder(tmp_path / "other", "scan", {"shard": None}).finish()  # its process lives on; the run let go
    finally:
        proc.kill()
        proc.wait()


def test_a_folder_named_with_its_shard_is_each_shards_own(tmp_path):
    from sinkscope.launcher import shard_folder

    assert shard_folder("runs/scan/{shard}", "2/4") == "runs/scan/2-of-4"
    assert shard_folder("runs/{shard}-scan", (0, 3)) == "runs/0-of-3-scan"
    assert shard_folder("runs/scan/{shard}", None) == "runs/scan/0-of-1"  # unsharded: one shard of one
    assert shard_folder("runs/scan", "1/2") == "runs/scan"
    folder = RunFolder(tmp_path / "{shard}", "scan", {"shard": "1/3"})
    assert folder.path == tmp_path / "1-of-3" and (tmp_path / "1-of-3" / "run.json").is_file()
    folder.finish()


def test_a_command_on_a_folder_another_process_writes_fails_before_its_model_loads(tmp_path):
    from typer.testing import CliRunner

    from sinkscope.cli import app

    proc = _holder(tmp_path / "run", 120, "hold")
    try:
        result = CliRunner().invoke(app, ["scan", "--model", str(tmp_path / "no-such-model"), "--out",
                                          str(tmp_path / "run")])
    finally:
        proc.kill()
        proc.wait()
    assert result.exit_code == 2 and "being written by another process" in result.output, result.output
    assert "no-such-model" not in result.output  # refused before the model was looked for


# -- a process killed in the middle of an append (SIGKILL, a full disk): the resume cuts each table back to its last
# commit (rows_committed.json, written before the ids of each marked batch)


def _committed_folder(path):
    folder = RunFolder(path, "scan", {"shard": None})
    folder.append_rows("token_stats", pd.DataFrame({"sample": ["s1", "s1"], "token": ["a", "line\nbreak"],
                                                    "phi": [1.0, 2.0]}))
    folder.mark_done(["s1"])
    return folder


def test_every_cut_of_an_unmarked_append_resumes_to_the_marked_rows(tmp_path):
    """Rows of an unmarked batch cut at every byte (quoted strings and a newline inside one among them): the resume
    keeps exactly the marked sample's rows, where pandas alone stopped at 'EOF inside string'."""
    folder = _committed_folder(tmp_path / "run")
    folder.append_rows("token_stats", pd.DataFrame({"sample": ["s10", "s10"], "token": ["x\ny", "z"],
                                                    "phi": [3.0, 4.0]}))
    folder.release()
    csv = tmp_path / "run" / "token_stats.csv"
    whole = csv.read_bytes()
    committed = whole.index(b'"s10"')
    for cut in range(committed, len(whole) + 1):
        csv.write_bytes(whole[:cut])
        RunFolder(tmp_path / "run", "scan", {"shard": None}).release()
        assert csv.read_bytes() == whole[:committed], cut
        rows = pd.read_csv(csv, dtype={"sample": str})
        assert rows["sample"].tolist() == ["s1", "s1"] and rows["token"].tolist() == ["a", "line\nbreak"], cut


def test_rows_committed_before_their_ids_were_marked_are_dropped(tmp_path):
    """Killed between the commit record and the ids: the batch's rows are inside the recorded size but their samples
    are not done, so they are read and dropped; a table first appended in the unmarked batch goes whole."""
    folder = _committed_folder(tmp_path / "run")
    folder.append_rows("token_stats", pd.DataFrame({"sample": ["s2"], "token": ["b"], "phi": [5.0]}))
    folder.append_rows("sink_tokens", pd.DataFrame({"sample": ["s2"], "position": [3]}))
    folder._appended.discard("sink_tokens")  # as if killed before this table's size was recorded
    real_fsync = __import__("os").fsync
    calls = []

    def die_at_the_ids(fd):  # the commit record's fsync passes, the ids' write is the one that never lands
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("os.fsync", die_at_the_ids)
        with pytest.raises(KeyboardInterrupt):
            folder.mark_done(["s2"])
    (tmp_path / "run" / "samples_done.txt").write_text("s1\n")  # the ids' append never reached the disk
    folder.release()
    (tmp_path / "run" / "sink_tokens.csv").write_bytes(b'"sample","position"\n"s')  # and cut short
    resumed = RunFolder(tmp_path / "run", "scan", {"shard": None})
    assert pd.read_csv(tmp_path / "run" / "token_stats.csv")["sample"].tolist() == ["s1", "s1"]
    assert not (tmp_path / "run" / "sink_tokens.csv").exists()
    with open(tmp_path / "run" / "token_stats.csv", "ab") as f:  # killed again, in the middle of the next append
        f.write(b'"s2","b",5\n"s3","cut')
    resumed.release()
    resumed = RunFolder(tmp_path / "run", "scan", {"shard": None})  # the record was rewritten for the filtered table
    assert pd.read_csv(tmp_path / "run" / "token_stats.csv")["sample"].tolist() == ["s1", "s1"]
    resumed.append_rows("token_stats", pd.DataFrame({"sample": ["s2"], "token": ["b"], "phi": [5.0]}))
    resumed.mark_done(["s2"])
    assert pd.read_csv(tmp_path / "run" / "token_stats.csv")["sample"].tolist() == ["s1", "s1", "s2"]


def test_a_cut_table_of_a_run_without_commit_records_names_the_fix(tmp_path):
    """A run folder written before commits were recorded, with a marked sample, cannot tell where its rows end."""
    from sinkscope.errors import SinkscopeError
    from sinkscope.runfolder import COMMITTED

    _committed_folder(tmp_path / "run").release()
    (tmp_path / "run" / COMMITTED).unlink()
    with open(tmp_path / "run" / "token_stats.csv", "ab") as f:
        f.write(b'"s2","cut sh')
    with pytest.raises(SinkscopeError, match=r"token_stats.csv ends in a row cut short .*--no-resume"):
        RunFolder(tmp_path / "run", "scan", {"shard": None})


_KILL_MID_APPEND = """
import os, sys
from sinkscope import runfolder
real = runfolder.RunFolder.append_rows
seen = []

def append_then_die(self, table, frame):
    if table == "token_stats":
        seen.append(1)
        if len(seen) == 3:  # the third batch: about half its rows reach the file, cut inside a quoted string
            text = runfolder.arrow_csv(frame, False)
            cut = next(q for q in range(len(text) // 2, len(text)) if text[q:q + 1] == b'"' and not text[:q].count(b'"') % 2)
            with open(self.path / "token_stats.csv", "ab") as f:
                f.write(text[: cut + 2])
            os._exit(137)  # gone, as under SIGKILL: no finally block, no clean-up
    real(self, table, frame)

runfolder.RunFolder.append_rows = append_then_die
from sinkscope.cli import app
app(sys.argv[1:])
"""


def test_a_scan_killed_in_the_middle_of_an_append_resumes_to_the_uninterrupted_tables(tmp_path):
    """The scan's own process dies (no clean-up, as under SIGKILL) halfway through writing a batch's token rows; the
    same command resumes it, and every per-sample table equals an uninterrupted run's."""
    import json
    import subprocess
    import sys

    from typer.testing import CliRunner

    from sinkscope.cli import app
    from sinkscope.runfolder import COMMITTED

    args = ["scan", "--model", "tiny", "--limit", "5", "--batch-size", "1", "--calibration", "2", "--token-stats", "all"]
    killed = subprocess.run([sys.executable, "-c", _KILL_MID_APPEND, *args, "--out", str(tmp_path / "killed")],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert len((tmp_path / "killed" / "samples_done.txt").read_text().split()) == 2  # the batches before it
    recorded = json.loads((tmp_path / "killed" / COMMITTED).read_text())["sizes"]["token_stats"]
    assert (tmp_path / "killed" / "token_stats.csv").stat().st_size > recorded  # half a batch's rows past the commit
    with pytest.raises(pd.errors.ParserError, match="EOF inside string"):  # what resuming read before commit records
        pd.read_csv(tmp_path / "killed" / "token_stats.csv")
    for out in ("killed", "whole"):
        result = CliRunner().invoke(app, args + ["--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    for table in ("token_stats", "massive_activations", "head_scores_per_sample", "sink_tokens"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed" / f"{table}.csv"),
                                      pd.read_csv(tmp_path / "whole" / f"{table}.csv"), obj=table)
