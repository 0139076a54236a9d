"""`cfvit export`: two exports to one folder at once, and which weights of a checkpoint it loaded."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.app.cli.support import ENTRY, ROOT, run
from tests.conftest import FIXTURES


# -- two exports to the same folder at once (issue 13 item 2) ---------------------------------------------
@pytest.mark.slow
def test_two_concurrent_exports_exactly_one_wins(tmp_path) -> None:
    """Both runs pass the existence check at start; the no-clobber rename at the end lets only one win."""
    from cfvit_deploy.manifest import Manifest

    out = tmp_path / "same"
    argv = [sys.executable, "-c", ENTRY, "export", str(FIXTURES / "deit_g7.pth"), "--out", str(out), "--num-heads", "3"]
    procs = [
        subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert re.search(rf"^error: {re.escape(str(out))} already exists", loser, re.M), loser
    assert "exported CF-ViT" not in loser  # the loser does not claim success
    Manifest.load(out)  # the winner's export, complete and consistent
    assert [p.name for p in tmp_path.iterdir()] == ["same"]  # the loser left nothing behind


def test_export_says_which_weights_it_loaded(capfd, tmp_path) -> None:
    """timm's saver keeps trained and EMA weights: the default takes the EMA, says so and records it (item 20)."""
    state = torch.load(FIXTURES / "deit_g7.pth", weights_only=True)["model"]
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, tmp_path / "last.pth.tar")
    code, out, err = run(
        capfd, "export", tmp_path / "last.pth.tar", "-o", tmp_path / "exp", "--num-heads", "3", "--no-simplify"
    )
    assert code == 0, err
    assert f"loaded the EMA weights (state_dict_ema) of {tmp_path / 'last.pth.tar'}" in err
    source = json.loads((tmp_path / "exp" / "manifest.json").read_text())["source"]
    assert source["checkpoint"]["weights"] == "state_dict_ema"
    code, out, err = run(
        capfd,
        "export",
        tmp_path / "last.pth.tar",
        "-o",
        tmp_path / "exp2",
        "--num-heads",
        "3",
        "--no-simplify",
        "--weights",
        "model",
    )
    assert code == 0 and "loaded the trained weights (state_dict)" in err
