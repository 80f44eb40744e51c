"""Run folders: run.json, tidy CSV tables, figures, index.md; atomic and resumable.

Per-sample rows are appended to ``<table>.csv`` as each sample finishes, and the sample's id
is appended to ``samples_done.txt`` only after all its rows are written and the size of every
appended table recorded (``rows_committed.json``, atomically, before the ids). On resume each table
is cut back to its recorded size (a process killed in the middle of an append, or a full disk,
leaves a row cut short), rows of samples that are not in the done list (an interrupted sample) are
dropped, and finished samples are skipped. Shards of one evaluation written to separate folders merge with
`sinkscope merge` (analyses/merge.py) since every row carries its sample id. One process writes a
folder at a time: a second one is refused with the first one's pid, host and command (`.sinkscope.lock`,
a POSIX record lock the system releases when the holder ends, however it ends).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sinkscope.errors import SinkscopeError
from sinkscope.launcher import shard_folder


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_csv(path: Path, frame: pd.DataFrame) -> None:
    buf = io.StringIO()
    frame.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def arrow_csv(frame: pd.DataFrame, header: bool) -> bytes | None:
    """`frame` as CSV by Arrow's C++ writer (~5x pandas' `to_csv` on a scan's 20k token rows per LLaVA sample,
    which is the per-sample cost that matters next to a 30 ms forward on a GPU), or None where a column is not
    plain bool, integer, float or text (pandas writes those). pandas reads the text back to the frame pandas'
    own writer gives (tests/test_runfolder.py; floats bit for bit where its parser is exact, pandas 3's default):
    strings are quoted, booleans `true`/`false`, missing values empty."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        table = _arrow_table(frame)
    except pa.ArrowException:
        return None
    plain = (pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating, pa.types.is_string,
             pa.types.is_large_string, pa.types.is_null)
    if not all(any(kind(field.type) for kind in plain) for field in table.schema):
        return None
    out = io.BytesIO()
    try:
        pa_csv.write_csv(table, out, pa_csv.WriteOptions(include_header=header))
    except pa.ArrowException:  # a type the writer cannot format (e.g. float16 in some versions)
        return None
    return out.getvalue()


def _arrow_table(frame: pd.DataFrame):
    """`frame` as an Arrow table, column by column as `pa.Table.from_pandas` converts them (arrow-backed columns as
    they are, numpy ones and objects through `pa.array(..., from_pandas=True)`: NaN and None become nulls), without
    its per-table overhead (~0.2 ms a table; a scan batch appends 7 small ones); from_pandas itself for other
    extension types and for duplicate or non-text column names."""
    import pyarrow as pa

    names = list(frame.columns)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return pa.Table.from_pandas(frame, preserve_index=False)
    arrays = []
    for _, column in frame.items():
        values = column.array
        if hasattr(values, "__arrow_array__"):
            arrays.append(pa.array(values))
        elif isinstance(column.dtype, np.dtype):
            arrays.append(pa.array(column.to_numpy(), from_pandas=True))
        else:  # another pandas extension type (categorical, ...): from_pandas decides
            return pa.Table.from_pandas(frame, preserve_index=False)
    return pa.Table.from_arrays(arrays, names=names)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("sinkscope", "torch", "transformers", "nnsight", "numpy", "pandas", "scipy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# where and how the model runs, not what is computed: run.json records it, but a run may resume (and its shards
# merge) under another placement: each torchrun worker runs on its own GPU (cuda:LOCAL_RANK); a map spreads the layers
# otherwise; var-eval's --compile fuses the same edit (equal within float rounding, tests/test_var.py); a remote run's
# --batches-per-request bundles the same traces into fewer requests (equal tables, tests/test_remote.py)
PLACEMENT = ("device", "device_map", "max_memory", "compile", "batches_per_request")


LOCK_NAME = ".sinkscope.lock"  # in a run folder: held by the process writing it
COMMITTED = "rows_committed.json"  # {"sizes": {table: bytes}, "n_done": lines of samples_done.txt}, per mark_done


def _holder(path: Path) -> str:
    """Who holds `path`'s lock, in words, from what the holder wrote into the lock file."""
    try:
        who = json.loads((path / LOCK_NAME).read_text())
        return f"pid {who['pid']} on {who['host']} since {who['started']}: {who['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid not yet written"


def _in_use(path: Path) -> SinkscopeError:
    return SinkscopeError(f"{path} is being written by another process ({_holder(path)}); two processes writing one "
                          "run folder would mix their rows. Let it finish (the same command then resumes or finds the "
                          "run done), or give this run its own --out; workers started by one command line (torchrun, "
                          "accelerate launch, a SLURM array) each get their own with --out 'runs/NAME/{shard}', "
                          "merged by `sinkscope merge runs/NAME/* --out runs/NAME-all`")


def _try_lock(f, path: Path) -> bool:
    """Lock the open lock file `f` of `path` for this process: True, or False where the file system has no locks
    (ENOLCK, ENOSYS...); SinkscopeError naming the holder where another process holds it."""
    import fcntl

    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: another process holds it
        raise _in_use(path) from None
    except OSError:
        return False
    return True


def lock_folder(path: Path):
    """Take `path`'s write lock for this process: the open lock file (keep it: closing it releases the lock), or
    None where the file system has no locks (or the platform no fcntl). Raises SinkscopeError, naming the holder,
    when another process holds it. A POSIX record lock: the system drops it when its process ends, crashed or
    killed, so an interrupted run leaves nothing stale; within one process a second lock on the folder succeeds."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    f = open(path / LOCK_NAME, "a+")
    try:
        locked = _try_lock(f, path)
    except SinkscopeError:
        f.close()
        raise
    if not locked:  # a file system without locks: run unguarded, as before locks existed
        f.close()
        return None
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
                        "command": " ".join(sys.argv)}))
    f.flush()
    return f


def check_not_in_use(path: str | Path) -> None:
    """Raise SinkscopeError when another process holds `path`'s write lock (cheap: commands call it before loading a
    model; the lock `RunFolder` takes is what guards the folder)."""
    path = Path(path)
    if not (path / LOCK_NAME).is_file():
        return
    try:
        import fcntl

        f = open(path / LOCK_NAME, "a")
    except (ImportError, OSError):  # no fcntl, or a folder this process cannot write (the run itself will say so)
        return
    with f:
        if _try_lock(f, path):
            fcntl.lockf(f, fcntl.LOCK_UN)


def check_resumable(path: str | Path, analysis: str, params: dict, resume: bool = True,
                    unresolved: tuple[str, ...] = ()) -> None:
    """Raise when `path` holds a run of another analysis or with other parameters (limit and the device map aside)
    and would be resumed; cheap, so commands call it before loading a model. unresolved: parameters not known yet
    (e.g. a sink score 'auto' resolved once the model is loaded), left out of the comparison."""
    path = Path(shard_folder(path, params.get("shard")))  # "runs/scan/{shard}" -> this shard's folder
    check_not_in_use(path)
    run_json = path / "run.json"
    if not resume or not run_json.exists():
        return
    try:
        meta = json.loads(run_json.read_text())
    except (OSError, ValueError) as err:
        raise SinkscopeError(f"{run_json} cannot be read ({err}); use another --out, or --no-resume to start over")
    skip = ("limit", "resume") + PLACEMENT + tuple(unresolved)
    old = {k: v for k, v in meta.get("params", {}).items() if k not in skip}
    # a parameter added to the config after the run was written matches while it is None
    new = {k: v for k, v in params.items() if k not in skip and (k in old or v is not None)}
    if meta.get("analysis") != analysis or _jsonable(old) != _jsonable(new):
        changed = sorted(k for k in set(old) | set(new) if _jsonable(old.get(k)) != _jsonable(new.get(k)))
        what = (f"a {meta.get('analysis')} run" if meta.get("analysis") != analysis else
                f"a {analysis} run with other parameters ({', '.join(changed[:6])})")
        raise SinkscopeError(f"{path} holds {what}; use another --out, or --no-resume to start over")


class RunFolder:
    """One analysis run on disk. fingerprint: the model's `weights_fingerprint()`, recorded in run.json; resuming
    a run made with other weights of the model (a retrained checkpoint under the same name) is refused, as its
    rows and the new ones would mix two models (runs written before fingerprints were recorded pass)."""

    def __init__(self, path: str | Path, analysis: str, params: dict, resume: bool = True,
                 fingerprint: str | None = None):
        self.path = Path(shard_folder(path, params.get("shard")))  # "{shard}" in --out: this shard's own folder
        self.analysis = analysis
        run_json = self.path / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise SinkscopeError(f"--out {self.path} is a file; give a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.path)  # before anything is read or written: one writer at a time
        self.meta: dict = {}
        resuming = run_json.exists() and resume
        if resuming:
            self.meta = json.loads(run_json.read_text())
            check_resumable(self.path, analysis, params, resume)
            recorded = self.meta.get("model_fingerprint")
            if fingerprint and recorded and recorded != fingerprint:
                raise SinkscopeError(f"{self.path} holds a run made with other weights of this model (weights "
                                     f"fingerprint {recorded}, now {fingerprint}); use another --out, or --no-resume "
                                     "to start over")
        elif run_json.exists() and not resume:
            for f in self.path.iterdir():
                if f.is_file() and f.name != LOCK_NAME:
                    f.unlink()
        self.meta.setdefault("analysis", analysis)
        self.meta["params"] = _jsonable(params)
        if fingerprint:
            self.meta["model_fingerprint"] = fingerprint
        self.meta.setdefault("started", now())
        self.meta["resumed"] = bool(self.done_samples())
        self.meta["versions"] = package_versions()
        self.meta["git_commit"] = git_commit()
        self.meta.pop("finished", None)
        self._committed: dict[str, int] = {}  # table -> bytes of its CSV that belong to marked batches
        self._appended: set[str] = set()  # tables appended since the last mark_done
        if resuming:  # a run stopped in its first batch has rows but no samples_done.txt yet
            self._drop_unfinished_rows()
        self._n_done = len(_lines(self.path / "samples_done.txt"))
        self.write_meta()

    # -- metadata ------------------------------------------------------------------------
    def write_meta(self) -> None:
        atomic_write_text(self.path / "run.json", json.dumps(_jsonable(self.meta), indent=1))

    def update_meta(self, **fields) -> None:
        self.meta.update(fields)
        self.write_meta()

    def finish(self, **fields) -> None:
        """Record the run as finished and let other processes write the folder again."""
        self.meta.update(fields)
        self.meta["finished"] = now()
        self.write_meta()
        self.release()

    def release(self) -> None:
        """Give up the folder's write lock (also done by `finish`, and by the system when this process ends)."""
        if getattr(self, "_lock", None) is not None:
            self._lock.close()
            self._lock = None

    # -- per-sample appends -------------------------------------------------------------
    def done_samples(self) -> set[str]:
        f = self.path / "samples_done.txt"
        return set(f.read_text().split("\n")) - {""} if f.exists() else set()

    def append_rows(self, table: str, frame: pd.DataFrame) -> None:
        """Append rows (must carry a `sample` column) to `<table>.csv`.

        A frame with columns but no rows still creates the file (header only), so a table the
        run folder promises (e.g. sink_tokens.csv when no token is a sink) always exists.
        """
        if frame is None or len(frame.columns) == 0:
            return
        path = self.path / f"{table}.csv"
        header = not path.exists()
        if frame.empty and not header:
            return
        self._appended.add(table)
        text = arrow_csv(frame, header)
        if text is None:  # a column Arrow does not type as pandas would write it
            with open(path, "a") as f:
                frame.to_csv(f, header=header, index=False)
        else:
            with open(path, "ab") as f:
                f.write(text)

    def mark_done(self, sample_ids) -> None:
        """Mark samples done whose rows are all appended: first the size of every appended table (the commit point
        a resume cuts the tables back to), then the ids."""
        sample_ids = list(sample_ids)
        for table in self._appended:
            self._committed[table] = (self.path / f"{table}.csv").stat().st_size
        self._appended = set()
        self._write_commit(self._n_done + len(sample_ids))
        with open(self.path / "samples_done.txt", "a") as f:
            for s in sample_ids:
                f.write(f"{s}\n")
            f.flush()
            os.fsync(f.fileno())
        self._n_done += len(sample_ids)

    def _write_commit(self, n_done: int) -> None:
        """rows_committed.json, atomically: the committed size of every appended table, and the done lines it covers."""
        atomic_write_text(self.path / COMMITTED, json.dumps({"sizes": self._committed, "n_done": n_done}))

    def _drop_unfinished_rows(self) -> None:
        """On resume: each appended table cut back to its size at the last commit (a row cut short by a killed
        process or a full disk goes), then the rows of samples not marked done dropped. Where the commit counted
        every line of samples_done.txt, the cut tables hold exactly the done samples' rows and are not read."""
        done_lines = _lines(self.path / "samples_done.txt")
        done = set(done_lines)
        committed = None
        if (self.path / COMMITTED).exists():
            try:
                committed = json.loads((self.path / COMMITTED).read_text())
                self._committed = {str(k): int(v) for k, v in committed["sizes"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                committed = None  # unreadable: the tables are read and filtered, as before commits were recorded
        for csv in self.path.glob("*.csv"):
            size = self._committed.get(csv.stem)
            if committed is not None and size is not None:
                if csv.stat().st_size > size:
                    with open(csv, "r+b") as f:
                        f.truncate(size)
                if committed.get("n_done") == len(done_lines):
                    continue
            try:
                frame = pd.read_csv(csv, dtype={"sample": str})
            except pd.errors.EmptyDataError:
                csv.unlink()
                continue
            except pd.errors.ParserError as err:  # a row cut short at the end
                if size is None and (committed is not None or not done):  # no row of it was ever marked done
                    csv.unlink()
                    continue
                why = ("this run predates the commit records that would say where its rows end" if committed is None
                       else "its recorded rows cannot be read")
                raise SinkscopeError(f"{csv} ends in a row cut short (its process was killed while appending, or the "
                                     f"disk filled: {str(err).strip()}), and {why}; delete the cut row at the file's "
                                     "end, or start over with --no-resume") from None
            if "sample" not in frame.columns:
                continue
            kept = frame[frame["sample"].astype(str).isin(done)]
            if len(kept) != len(frame):
                atomic_write_csv(csv, kept)
                if csv.stem in self._committed:
                    self._committed[csv.stem] = csv.stat().st_size
        if committed is not None:  # the record now describes the folder as cut and filtered: done lines, their rows
            self._write_commit(len(done_lines))

    def read(self, table: str) -> pd.DataFrame:
        path = self.path / f"{table}.csv"
        if not path.exists():
            return pd.DataFrame()
        return pd.read_csv(path, dtype={"sample": str})

    # -- whole files ---------------------------------------------------------------------
    def write_table(self, table: str, frame: pd.DataFrame) -> Path:
        """`<table>.csv` written whole (atomically); a table appended before is no longer cut back on resume."""
        path = self.path / f"{table}.csv"
        atomic_write_csv(path, frame)
        if self._committed.pop(table, None) is not None:
            self._write_commit(self._n_done)
        self._appended.discard(table)
        return path

    def write_json(self, name: str, obj) -> Path:
        path = self.path / name
        atomic_write_text(path, json.dumps(_jsonable(obj), indent=1))
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path / name
        atomic_write_text(path, text)
        return path


def _lines(path: Path) -> list[str]:
    """The non-empty lines of a text file ([] when it does not exist)."""
    return [line for line in path.read_text().split("\n") if line] if path.exists() else []


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            return str(obj)
    if isinstance(obj, float) and obj != obj:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
