"""Bad and malicious checkpoints through `cfvit export` and `cfvit validate`: one line, exit 1, no payload run."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.app.cli.support import assert_one_error, lit, run, run_subprocess
from tests.conftest import FIXTURES


# -- checkpoints through `cfvit export` ------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _checkpoint(kind: str, d: Path) -> tuple[Path, list[str], str]:
    """A bad checkpoint of `kind`, extra export flags, and the regex of the error line it must give."""
    p = d / "model.pth"
    if kind == "missing file":
        return p, [], lit(f"error: checkpoint not found: {p}")
    if kind == "directory":
        p.mkdir()
        return p, [], lit(f"error: checkpoint path is a directory, not a file: {p}")
    if kind == "empty file":
        p.write_bytes(b"")
        return (
            p,
            [],
            lit(f"error: not a readable PyTorch checkpoint (corrupt or truncated?): {p} is an empty file (0 bytes)"),
        )
    if kind == "text file":
        p.write_text("hello, I am a text file\n")  # no stray pickle opcode number (issue 13 item 9)
        return (
            p,
            [],
            lit(f"error: not a PyTorch checkpoint: {p} is a text file (24 bytes, starting 'hello, I am a text file')"),
        )
    if kind == "random bytes":
        p.write_bytes(b"\x0f" + np.random.default_rng(0).bytes(4095))
        return (
            p,
            [],
            lit(
                f"error: not a PyTorch checkpoint: {p} is binary data of 4,096 bytes that is not a "
                "PyTorch checkpoint (random or damaged bytes)"
            ),
        )
    if kind == "truncated":
        data = (FIXTURES / "deit_g7.pth").read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return (
            p,
            [],
            lit(
                f"error: not a readable PyTorch checkpoint (corrupt or truncated?): {p} is a zip archive of "
                f"{len(data) // 2:,} bytes that torch cannot read (truncated, or not made by torch.save)"
            ),
        )
    if kind == "a bare tensor":
        torch.save(torch.zeros(3), p)
        return p, [], lit("error: checkpoint holds a Tensor, not a dict of tensors")
    if kind == "ResNet keys":
        torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}}, p)
        return (
            p,
            [],
            lit(
                "error: checkpoint is not a CF-ViT: missing patch_embed.proj.weight, pos_embed_list.0, pos_embed_list.1"
            ),
        )
    if kind == "plain DeiT keys":
        torch.save(
            {"model": {"pos_embed": torch.zeros(1, 197, 48), "patch_embed.proj.weight": torch.zeros(48, 3, 16, 16)}}, p
        )
        return (
            p,
            [],
            lit(
                "error: checkpoint is a plain ViT/DeiT (single pos_embed, no pos_embed_list.0/1), not a "
                "CF-ViT: cfvit-deploy exports CF-ViT models only; train one with `cfvit train` (or fine-tune "
                "these weights into a CF-ViT with the original CF-ViT code) and export that"
            ),
        )
    if kind == "g=9 weights, --num-heads 5":
        return (
            FIXTURES / "deit_g9.pth",
            ["--num-heads", "5"],
            lit("error: num_heads 5 does not divide the checkpoint's width (embed_dim 48)"),
        )
    if kind == "g=9 weights, metadata claims g=7":
        state = torch.load(FIXTURES / "deit_g9.pth", weights_only=True)["model"]
        g7 = json.loads((FIXTURES / "deit_g7.json").read_text())
        keys = ("arch", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "num_classes", "coarse_grid")
        torch.save({"model": state, "cfvit_deploy": {"config": {k: g7[k] for k in keys}}}, p)
        return (
            p,
            [],
            lit(
                "error: checkpoint does not match CF-ViT deit (embed 48, depth 12, g=7): 2 shape mismatches "
                "(pos_embed_list.0: checkpoint (1, 82, 48) vs model (1, 50, 48); "
                "pos_embed_list.1: checkpoint (1, 325, 48) vs model (1, 197, 48))"
            ),
        )
    raise AssertionError(kind)


CHECKPOINTS = [
    "missing file",
    "directory",
    "empty file",
    "text file",
    "random bytes",
    "truncated",
    "a bare tensor",
    "ResNet keys",
    "plain DeiT keys",
    "g=9 weights, --num-heads 5",
    "g=9 weights, metadata claims g=7",
]


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_bad_checkpoint_is_one_line_exit_1(capfd, tmp_path, kind) -> None:
    path, flags, pattern = _checkpoint(kind, tmp_path)
    code, out, err = run(capfd, "export", path, "-o", tmp_path / "exp", *flags)
    assert code == (2 if "--num-heads" in kind else 1)  # a flag that does not fit is a usage error
    assert_one_error(err, pattern)
    assert out == "" and not (tmp_path / "exp").exists()


@pytest.mark.parametrize("fmt", ["raw pickle", "torch.save zip"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(capfd, tmp_path, fmt) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if fmt == "raw pickle":
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    code, out, err = run(capfd, "export", path, "-o", tmp_path / "exp")
    assert code == 1
    assert_one_error(
        err,
        lit(
            f"error: refusing to load {path}: it contains Python objects that would run code when "
            "unpickled (posix.system); only plain tensors and containers are accepted"
        ),
    )
    assert not marker.exists() and not (tmp_path / "exp").exists()
    # control: the payload is real, an unrestricted unpickler runs it
    if fmt == "raw pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


def test_validate_with_a_checkpoint_of_another_model(capfd, tmp_path, export_dir) -> None:
    code, out, err = run(
        capfd, "validate", export_dir, "--checkpoint", FIXTURES / "deit_g9.pth", "--report", tmp_path / "r.json"
    )
    assert code == 1
    assert_one_error(
        err,
        lit(
            "error: checkpoint does not match this export: checkpoint does not match CF-ViT deit "
            "(embed 48, depth 12, g=7): 2 shape mismatches (pos_embed_list.0: checkpoint (1, 82, 48) "
            "vs model (1, 50, 48); pos_embed_list.1: checkpoint (1, 325, 48) vs model (1, 197, 48))"
        ),
    )
    assert out == "" and not (tmp_path / "r.json").exists()


def test_validate_refuses_a_malicious_checkpoint(capfd, tmp_path, export_dir) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    code, out, err = run(
        capfd, "validate", export_dir, "--checkpoint", tmp_path / "evil.pth", "--report", tmp_path / "r.json"
    )
    assert code == 1
    assert_one_error(
        err,
        lit(
            f"error: refusing to load {tmp_path / 'evil.pth'}: "  # not "does not match": it is no checkpoint
            "it contains Python objects that would run code when unpickled (posix.system); only plain "
            "tensors and containers are accepted"
        ),
    )
    assert not marker.exists()


def test_subprocess_malicious_checkpoint_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": _Payload(marker)}))
    proc = run_subprocess("export", tmp_path / "evil.pth", "-o", tmp_path / "exp")
    assert proc.returncode == 1 and proc.stdout == ""
    assert_one_error(
        proc.stderr,
        r"error: refusing to load .+ \(posix\.system\); only plain tensors and containers "
        r"are accepted",
    )
    assert not marker.exists()
