"""Read finished runs back for comparison (``notebooks/compare_runs.ipynb``).

Three sources, one shape (:class:`Run`: name, overrides, config, per-step history rows):

- :func:`load_csv_runs`: the CSV logs of a run or of a Hydra sweep directory
  (``<job>/csv/metrics.csv`` with ``<job>/.hydra/overrides.yaml``; ``logger=csv`` or
  ``logger=csv_wandb``);
- :func:`load_wandb_offline`: W&B run directories written locally (``logger=wandb`` offline:
  ``<job>/wandb/offline-run-*``), decoded from their ``.wandb`` transaction log without any
  network or account;
- :func:`load_wandb_export`: a CSV downloaded from a W&B line panel ("Export panel -> CSV":
  columns ``Step`` and ``<run name> - <metric>``).

:func:`curves` and :func:`results_table` turn runs into rsum curves and one results row per
method (the overrides that differ between the runs of the sweep).
"""

from __future__ import annotations

import csv
import json
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "curves",
    "load_csv_runs",
    "load_wandb_export",
    "load_wandb_offline",
    "method_labels",
    "read_wandb_records",
    "results_table",
]


@dataclass
class Run:
    """One training run.

    Attributes:
        name: run name (job directory or W&B name).
        overrides: the Hydra overrides of the job (``key=value`` strings).
        config: the resolved config (nested dict; may be empty).
        history: logged rows (``{"step": ..., "epoch": ..., "dev/rsum": ...}``), in order.
        summary: final values (W&B summary; for CSV logs the last value of each key).
        path: where it was read from.
    """

    name: str
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def series(self, key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
        """(x values, values) of every history row holding ``key``."""
        xs, ys = [], []
        for i, row in enumerate(self.history):
            if key in row and _finite(row[key]):
                xs.append(float(row.get(x, i)))
                ys.append(float(row[key]))
        return xs, ys

    def best(self, key: str = "dev/rsum", mode: str = "max") -> float:
        _, ys = self.series(key)
        if not ys:
            return math.nan
        return max(ys) if mode == "max" else min(ys)

    def last(self, key: str) -> float:
        _, ys = self.series(key)
        return ys[-1] if ys else float(self.summary.get(key, math.nan))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _num(v: str) -> float | str:
    try:
        return float(v)
    except ValueError:
        return v


def _overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def _config(job_dir: Path) -> dict[str, Any]:
    path = job_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def _job_dirs(root: Path, marker: str) -> list[Path]:
    root = Path(root)
    found = {p.parents[marker.count("/")] for p in root.glob(f"**/{marker}")}
    return sorted(found, key=lambda p: (len(p.parts), _natural(p.name), str(p)))


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def load_csv_runs(root: str | Path) -> list[Run]:
    """Every run under ``root`` (a run directory or a sweep directory) that has CSV logs.

    CSV rows of one step are merged (Lightning writes train and dev figures in separate rows).
    """
    runs = []
    for job in _job_dirs(Path(root), "csv/metrics.csv"):
        with open(job / "csv" / "metrics.csv", newline="") as fh:
            raw: list[dict[str, Any]] = [
                {k: _num(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)
            ]
        history: list[dict[str, Any]] = []
        for row in raw:
            if history and history[-1].get("step") == row.get("step"):
                history[-1].update(row)
            else:
                history.append(dict(row))
        summary: dict[str, Any] = {}
        for row in history:
            summary.update(row)
        runs.append(
            Run(
                name=job.name,
                overrides=_overrides(job),
                config=_config(job),
                history=history,
                summary=summary,
                path=str(job),
            )
        )
    return runs


# --- W&B offline runs ---------------------------------------------------------------------------

_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic 0xBEE1 + version byte; every record header is 7 bytes too


def _log_records(data: bytes) -> Iterator[bytes]:
    """Payloads of a LevelDB-log formatted file (W&B's ``.wandb`` transaction log)."""
    pos, chunks = _HEADER, []
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if pos + _HEADER + length > len(data):  # a record still being written
            return
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0 and length == 0:  # zero padding
            continue
        if kind == 1:  # FULL
            yield payload
        elif kind == 2:  # FIRST
            chunks = [payload]
        elif kind == 3:  # MIDDLE
            chunks.append(payload)
        elif kind == 4:  # LAST
            chunks.append(payload)
            yield b"".join(chunks)
            chunks = []


_KNOWN_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)  # the log format version this reads
_FORMAT_HINT = (
    "read the run through `wandb sync` and the W&B API, or use the CSV log that logger=wandb "
    "writes beside it (csv/metrics.csv, load_csv_runs)"
)


def read_wandb_records(path: str | Path) -> Iterator[Any]:
    """Decoded ``wandb_internal_pb2.Record`` messages of a ``run-*.wandb`` file.

    The one place that decodes wandb's own (undocumented) transaction log: a file of another
    log format version, or a record the installed wandb cannot decode, raises ValueError saying
    so and naming the supported ways to read the run instead.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path}: not a W&B transaction log")
    if not data.startswith(_KNOWN_HEADER):
        raise ValueError(
            f"{path}: a W&B transaction log of an unknown format (header {data[:7]!r}, this "
            f"reader knows {_KNOWN_HEADER!r}); {_FORMAT_HINT}"
        )
    for payload in _log_records(data):
        record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf module
        try:
            record.ParseFromString(payload)
        except DecodeError as err:
            raise ValueError(
                f"{path}: a record the installed wandb cannot decode ({err}); {_FORMAT_HINT}"
            ) from err
        yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _set_nested(target: dict, key: str, value: Any) -> None:
    target[key] = value


def load_wandb_offline(root: str | Path) -> list[Run]:
    """Every offline W&B run under ``root`` (run dir, sweep dir or ``wandb/offline-run-*``).

    Reads name, group, config, history rows and the summary from the ``.wandb`` log.
    """
    runs = []
    for log in sorted(Path(root).glob("**/offline-run-*/run-*.wandb")):
        name, group = log.parent.name, ""
        config: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        for rec in read_wandb_records(log):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name = rec.run.display_name or rec.run.run_id or name
                group = rec.run.run_group
                for item in rec.run.config.update:
                    config[_item_key(item)] = _json(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    config[_item_key(item)] = _json(item.value_json)
            elif kind == "history":
                row = {_item_key(i): _json(i.value_json) for i in rec.history.item}
                history.append(row)
            elif kind == "summary":
                for item in rec.summary.update:
                    summary[_item_key(item)] = _json(item.value_json)
        config = {k: (v.get("value", v) if isinstance(v, dict) else v) for k, v in config.items()}
        for row in history:
            if "trainer/global_step" in row:
                row["step"] = row["trainer/global_step"]
        job = log.parents[2]  # <job>/wandb/offline-run-*/run-*.wandb
        runs.append(
            Run(
                name=name,
                overrides=_overrides(job) or [f"group={group}"] * bool(group),
                config=config,
                history=history,
                summary=summary,
                path=str(log.parent),
            )
        )
    return runs


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


# --- W&B panel export ---------------------------------------------------------------------------


def load_wandb_export(path: str | Path, x: str = "epoch") -> list[Run]:
    """Runs of a CSV exported from a W&B line panel.

    The export has a ``Step`` column (or ``trainer/global_step`` / ``epoch``) and per run and
    metric a column ``<run name> - <metric>`` (``__MIN`` / ``__MAX`` band columns are skipped).
    The x column is stored under ``x`` in the history rows.
    """
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return []
    columns = list(rows[0].keys())
    x_col = next(
        (c for c in columns if c.lower() in ("step", "epoch", "trainer/global_step", "_step")),
        columns[0],
    )
    by_run: dict[str, Run] = {}
    for col in columns:
        if col == x_col or " - " not in col or col.endswith(("__MIN", "__MAX")):
            continue
        run_name, metric = col.rsplit(" - ", 1)
        run = by_run.setdefault(run_name, Run(name=run_name, path=str(path)))
        if not run.history:
            run.history = [{} for _ in rows]
        for hist, row in zip(run.history, rows, strict=True):
            if row.get(col) not in ("", None):
                hist[x] = float(row[x_col])
                hist[metric] = float(row[col])
    for run in by_run.values():
        run.history = [h for h in run.history if h]
        run.overrides = [f"run={run.name}"]
    return list(by_run.values())


# --- comparison -----------------------------------------------------------------------------------


def method_labels(runs: Sequence[Run]) -> list[str]:
    """A label per run: the overrides that differ between the runs (the swept values)."""
    sets = [dict(o.split("=", 1) for o in r.overrides if "=" in o) for r in runs]
    keys = sorted({k for s in sets for k in s})
    varying = [k for k in keys if len({s.get(k) for s in sets}) > 1]
    labels = []
    for run, s in zip(runs, sets, strict=True):
        parts = [f"{k.split('/')[-1].split('.')[-1]}={s[k]}" for k in varying if k in s]
        labels.append(" ".join(parts) or run.name)
    return labels


def curves(
    runs: Iterable[Run], key: str = "dev/rsum", x: str = "epoch"
) -> dict[str, tuple[list[float], list[float]]]:
    """``{label: (x values, values)}`` of ``key`` per run (labels from :func:`method_labels`)."""
    runs = list(runs)
    return {label: run.series(key, x) for label, run in zip(method_labels(runs), runs, strict=True)}


def results_table(
    runs: Iterable[Run], split: str = "test", keys: Sequence[str] = ("i2t_r1", "t2i_r1", "rsum")
) -> list[dict[str, Any]]:
    """One row per method: ``method``, ``best dev rsum`` and the final ``<split>/<key>`` figures,
    sorted by best dev rsum (best first)."""
    runs = list(runs)
    rows = []
    for label, run in zip(method_labels(runs), runs, strict=True):
        row: dict[str, Any] = {"method": label, "best dev rsum": run.best("dev/rsum")}
        for k in keys:
            row[f"{split} {k}"] = run.last(f"{split}/{k}")
        rows.append(row)
    rows.sort(key=lambda r: -r["best dev rsum"] if _finite(r["best dev rsum"]) else math.inf)
    return rows
