"""Where inference rows go (torch-free): CSV, JSONL and Parquet sinks, and the summary JSON.

Every output is written to a temporary file beside it and renamed into place when the run ends,
also when it ends by an interrupt (:mod:`cfvit_deploy.io`), so an output is always a clean table
that pandas and pyarrow read with their defaults: no note rows, no extra columns. Whether the run
finished or was interrupted ("interrupted, N of M") is recorded in ``<output>.summary.json``,
written after the output.

Columns: CSV is flat (``path, stage, confidence, patches, label_1, prob_1, ..., overlay, error``);
JSONL and Parquet share :meth:`InferRow.to_json`'s layout (``topk`` a list of ``{label, prob}``).
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cfvit_deploy.extras import require
from cfvit_deploy.io import atomic_write_path

from .rows import InferRow, InferSummary

SUMMARY_SUFFIX = ".summary.json"
_PARQUET_ROW_GROUP = 1024


def summary_path(output: Path) -> Path:
    """Where the summary JSON of `output` goes: ``results.csv`` -> ``results.csv.summary.json``."""
    return output.with_name(output.name + SUMMARY_SUFFIX)


class CsvSink:
    """Flat CSV: ``path, stage, confidence, patches, label_1, prob_1, ..., overlay, error``."""

    def __init__(self, f: IO[str], topk: int) -> None:
        self.w, self.topk = csv.writer(f, lineterminator="\n"), topk
        ranks = [(f"label_{i}", f"prob_{i}") for i in range(1, topk + 1)]
        self.w.writerow(
            ["path", "stage", "confidence", "patches", *[c for pair in ranks for c in pair], "overlay", "error"]
        )

    def row(self, r: InferRow) -> None:
        pairs = [x for lp in zip(r.labels, (f"{p:.6g}" for p in r.probs), strict=True) for x in lp]
        pairs += [""] * (2 * self.topk - len(pairs))
        conf = "" if r.confidence is None else f"{r.confidence:.6g}"
        patches = "" if r.patches is None else str(r.patches)
        self.w.writerow([r.path, r.stage, conf, patches, *pairs, r.overlay, r.error])


class JsonlSink:
    """One :meth:`InferRow.to_json` object per line."""

    def __init__(self, f: IO[str]) -> None:
        self.f = f

    def row(self, r: InferRow) -> None:
        self.f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")


def row_schema() -> Any:
    """The Arrow schema of a row: :meth:`InferRow.to_json`'s layout (``topk`` a list of structs)."""
    pa = require("pyarrow", "parquet", "Parquet output")
    topk = pa.list_(pa.struct([("label", pa.string()), ("prob", pa.float64())]))
    return pa.schema(
        [
            ("path", pa.string()),
            ("stage", pa.string()),
            ("confidence", pa.float64()),
            ("patches", pa.int64()),
            ("topk", topk),
            ("overlay", pa.string()),
            ("error", pa.string()),
        ]
    )


class ParquetSink:
    """Rows as Parquet in the JSONL layout, written in row groups as they come."""

    def __init__(self, path: Path) -> None:
        self.pa = require("pyarrow", "parquet", "Parquet output")
        pq = require("pyarrow.parquet", "parquet", "Parquet output")
        self.schema = row_schema()
        self.w = pq.ParquetWriter(path, self.schema)
        self.buffer: list[dict[str, Any]] = []

    def row(self, r: InferRow) -> None:
        self.buffer.append(r.to_json())
        if len(self.buffer) >= _PARQUET_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.w.write_table(self.pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.w.close()


@contextlib.contextmanager
def open_sink(output: Path, topk: int, force: bool = False) -> Iterator[CsvSink | JsonlSink | ParquetSink]:
    """A sink writing `output` (by its suffix) through a temporary file renamed into place at the end.

    The rename happens when the block ends normally, and also when an interrupt ends it: the caller
    catches the ``KeyboardInterrupt`` inside the block so the rows done so far form a complete file.
    """
    suffix = output.suffix.lower()
    with atomic_write_path(output, force=force) as tmp:  # no-clobber unless force
        if suffix == ".parquet":
            sink = ParquetSink(tmp)
            try:
                yield sink
            finally:
                sink.close()
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                yield CsvSink(f, topk) if suffix == ".csv" else JsonlSink(f)


def write_summary(output: Path, summary: InferSummary, force: bool = False) -> Path:
    """Write ``<output>.summary.json`` atomically (after the output itself is in place)."""
    target = summary_path(output)
    with atomic_write_path(target, force=force) as tmp:
        tmp.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")
    return target
