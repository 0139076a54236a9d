"""`cfvit demo` on a full, over-quota, read-only or unwritable disk: one `error:` line naming the output and
the reason, exit 1, no traceback; what the earlier steps wrote is kept and no temporary is left (issue 22,
item 7).

The fast tests replace the heavy steps (training, export, sweep, validation, inference, bench) by stand-ins
that write what those steps write, and refuse the files the demo writes itself: the export's new default η
(``export/manifest.json``), ``report.md`` and ``summary.json``. The steps' own outputs go through the atomic
writers (tests/app/cli/test_disk_errors.py); the tests at the end run the real `cfvit demo --quick` and
refuse its first output (the image set), its checkpoint and its report.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import cli
from cfvit_deploy.app.bench import BenchRow
from cfvit_deploy.manifest import Manifest
from tests.app.cli.test_disk_errors import REASONS, one_error_line

CODES = [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES]


def refuse_writes(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """Opening `name` (or its atomic temporary ``.NAME.*``) for writing fails with `code`.

    A full disk (ENOSPC, EDQUOT) fails the write, whose OSError names no file; a read-only or unwritable
    one (EROFS, EACCES) fails the open, whose OSError names the file opened (a temporary, if any).
    """
    real_open = io.open

    def refusing_open(file, mode="r", *args, **kwargs):
        base = Path(os.fsdecode(file)).name if isinstance(file, (str, bytes, os.PathLike)) else ""
        if any(c in mode for c in "wax+") and (base == name or base.startswith(f".{name}.")):
            if code in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(code, os.strerror(code))
            raise OSError(code, os.strerror(code), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", refusing_open)


@dataclass
class _InferSummary:
    inputs: int = 3
    images: int = 3
    exited: int = 1
    fine: int = 2
    errors: int = 0
    overlays: int = 0
    seconds: float = 0.1


@pytest.fixture
def fast_steps(monkeypatch, export_dir_factory) -> None:
    """The demo's steps as stand-ins that write their outputs in a moment (the export: a real one, copied)."""
    import cfvit_deploy.app.bench
    import cfvit_deploy.app.demo
    import cfvit_deploy.app.sweep
    import exporters
    import runtimes.infer

    source = export_dir_factory("deit_g7")

    def train(out, quick, progress):
        (out / "data" / "val").mkdir(parents=True)
        (out / "cfvit-demo.pth").write_bytes(b"checkpoint")
        val = SimpleNamespace(coarse_acc=0.5, fine_acc=0.6)
        return SimpleNamespace(path=out / "cfvit-demo.pth", class_names=["a", "b"], val=val, history=[{"threads": 1}])

    def export(checkpoint, out_dir, **kwargs):
        shutil.copytree(source, out_dir)
        return Manifest.load(out_dir)

    choice = {
        "eta": 0.5, "accuracy": 0.6, "exit_rate": 0.5, "expected_gmacs": 0.04, "img_per_s": 500.0,
        "ms_per_image": 2.0, "batch_size": 32, "provider": "cpu",
        "budget": {"max_drop": 1.0, "reference_eta": 1.0, "reference_accuracy": 0.6},
    }  # fmt: skip
    row = SimpleNamespace(
        eta=0.5, accuracy=0.6, exit_rate=0.5, expected_gmacs=0.04, img_per_s=500.0, background_cpu_pct=None
    )
    swept = SimpleNamespace(rows=[row], choice=choice, save=lambda path: path.mkdir())
    validated = SimpleNamespace(checks=[1], passed=True, failed=[], save=lambda path: path.write_text("{}\n"))
    cells = [BenchRow("onnxruntime", "cpu", "fp32", model, 1, "none") for model in ("cfvit", "baseline")]

    def run_bench(export_dir, *, out, **kwargs):
        out.mkdir()
        return SimpleNamespace(rows=cells, machine={}, settings={})

    monkeypatch.setattr(cfvit_deploy.app.demo, "_train", train)
    monkeypatch.setattr(exporters, "export", export)
    monkeypatch.setattr(exporters, "validate", lambda *a, **k: validated)
    monkeypatch.setattr(cfvit_deploy.app.sweep, "sweep", lambda *a, **k: swept)
    monkeypatch.setattr(runtimes.infer, "infer", lambda *a, **k: _InferSummary())
    monkeypatch.setattr(cfvit_deploy.app.bench, "run_bench", run_bench)


def _temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")]


def test_the_stand_ins_run_the_whole_demo(fast_steps, tmp_path, capfd):
    """Without a refusal the demo with the stand-ins ends well (the tests below fail only where they refuse)."""
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "report.md").is_file() and (tmp_path / "d" / "summary.json").is_file()
    assert Manifest.load(tmp_path / "d" / "export").default_eta == 0.5
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
def test_the_default_eta_on_a_refusing_disk_names_the_manifest_and_keeps_the_export(
    fast_steps, tmp_path, capfd, monkeypatch, code
):
    out = tmp_path / "d"
    refuse_writes(monkeypatch, "manifest.json", code)
    # (the stand-in export copies the manifest with shutil, which io.open's refusal does not reach)
    result = cli.main(["demo", "--quick", "--out", str(out)])
    manifest = out / "export" / "manifest.json"
    one_error_line(capfd, result, rf"error: cannot write {re.escape(str(manifest))}: {REASONS[code]}")
    exported = Manifest.load(out / "export")  # the export as exported, not half a manifest
    assert exported.default_eta != 0.5 and "default_eta_chosen_by" not in exported.source
    assert (out / "cfvit-demo.pth").is_file() and not (out / "report.md").exists()
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("name", ["report.md", "summary.json"])
@pytest.mark.parametrize("code", CODES, ids=errno.errorcode.get)
def test_the_report_on_a_refusing_disk_is_one_line_and_keeps_the_earlier_steps(
    fast_steps, tmp_path, capfd, monkeypatch, name, code
):
    out = tmp_path / "d"
    refuse_writes(monkeypatch, name, code)
    result = cli.main(["demo", "--quick", "--out", str(out)])
    one_error_line(capfd, result, rf"error: cannot write {re.escape(str(out / name))}: {REASONS[code]}")
    assert not (out / name).exists() and (out / "validation.json").is_file() and (out / "sweep").is_dir()
    assert Manifest.load(out / "export").default_eta == 0.5  # the sweep's choice was kept
    assert (out / "report.md").is_file() == (name == "summary.json")
    assert _temporaries(tmp_path) == []


# -- the real `cfvit demo --quick` ---------------------------------------------------------------------------
def _refuse_temporaries(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int, which: tuple[str, ...]) -> None:
    """``tempfile.<which>`` with ``dir=folder`` fails with `code` (the atomic writers' first step there)."""
    for attr in which:
        real = getattr(tempfile, attr)

        def refusing(*args, _real=real, **kwargs):
            if kwargs.get("dir") is not None and Path(kwargs["dir"]).resolve() == folder.resolve():
                raise OSError(code, os.strerror(code), str(folder / ".x.tmp"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(tempfile, attr, refusing)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=errno.errorcode.get)
def test_real_demo_refused_its_image_set_is_one_line_exit_1(tmp_path, capfd, monkeypatch, code):
    out = tmp_path / "d"
    _refuse_temporaries(monkeypatch, out, code, ("mkstemp", "mkdtemp"))
    result = cli.main(["demo", "--quick", "--out", str(out)])
    one_error_line(capfd, result, rf"error: cannot write {re.escape(str(out / 'data'))}: {REASONS[code]}")
    assert os.listdir(out) == []


@pytest.mark.slow
def test_real_demo_refused_its_checkpoint_keeps_the_image_set(tmp_path, capfd, monkeypatch):
    out = tmp_path / "d"
    _refuse_temporaries(monkeypatch, out, errno.EROFS, ("mkstemp",))  # the data folder (mkdtemp) is written
    result = cli.main(["demo", "--quick", "--out", str(out)])
    checkpoint = out / "cfvit-demo.pth"
    one_error_line(capfd, result, rf"error: cannot write {re.escape(str(checkpoint))}: Read-only file system")
    assert (out / "data" / "val").is_dir() and not checkpoint.exists() and _temporaries(out) == []


@pytest.mark.slow
def test_real_demo_on_a_disk_full_at_the_report_keeps_every_earlier_step(tmp_path, capfd, monkeypatch):
    out = tmp_path / "d"
    monkeypatch.chdir(tmp_path)  # as test_demo: the benchmark's cell processes run elsewhere
    refuse_writes(monkeypatch, "report.md", errno.ENOSPC)
    result = cli.main(["demo", "--quick", "--out", str(out)])
    one_error_line(capfd, result, rf"error: cannot write {re.escape(str(out / 'report.md'))}: No space left on device")
    for kept in ("cfvit-demo.pth", "export/manifest.json", "sweep", "validation.json", "predictions.csv", "bench"):
        assert (out / kept).exists(), kept
    assert not (out / "report.md").exists() and _temporaries(out) == []
