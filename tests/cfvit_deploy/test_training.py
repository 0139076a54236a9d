"""Training: the paper's loss, the warm-up/selection switch, checkpoints, resume and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cli
from cfvit_deploy import ModelConfig, load_checkpoint, save_checkpoint
from cfvit_deploy.checkpoints import checkpoint_metadata
from cfvit_deploy.data.synthetic import CLASSES, make_synthetic_dataset
from cfvit_deploy.errors import CheckpointError, UsageError
from cfvit_deploy.flops import stage_gmacs
from cfvit_deploy.model import CFViT
from cfvit_deploy.training import (
    TrainRecipe,
    cfvit_loss,
    lr_at,
    make_optimizer,
    resume_recipe,
    train,
    train_demo,
    train_forward,
)
from cfvit_deploy.training_recipe import DEMO_EXPECTED_FINE, DEMO_EXPECTED_GAP

#: g=2 keeps the real depth and width but makes the input 64 px (fast on 2 cores).
TINY = TrainRecipe(coarse_grid=2, epochs=2, batch_size=10, lr=1e-3, warmup_epochs=0.5, selection_after=1)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy shared machine more threads are many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training and one validation image per class, drawn at 64 px (resized to 224 by preprocessing)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("train") / "data", 2, 1, image_size=64)


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model.pth"
    train(data, out, TINY, progress=None)
    return out


def _model(num_classes: int = 5, grid: int = 2) -> CFViT:
    torch.manual_seed(0)
    return CFViT(ModelConfig.named("deit", "micro", num_classes=num_classes, coarse_grid=grid))


def test_kl_is_zero_for_equal_logits_and_is_kl_fine_given_coarse() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    _, _, kl = cfvit_loss(logits, logits.clone(), torch.zeros(4, dtype=torch.long))
    assert abs(float(kl)) < 1e-6
    coarse = torch.randn(4, 6, requires_grad=True)
    fine = torch.randn(4, 6, requires_grad=True)
    _, _, kl = cfvit_loss(coarse, fine, torch.zeros(4, dtype=torch.long))
    p_f, p_c = fine.softmax(-1), coarse.softmax(-1)
    expected = (p_f * (p_f.log() - p_c.log())).sum(-1).mean()
    reverse = (p_c * (p_c.log() - p_f.log())).sum(-1).mean()
    torch.testing.assert_close(kl, expected)
    assert not torch.allclose(kl, reverse)
    kl.backward()
    assert fine.grad is None and coarse.grad is not None and coarse.grad.abs().sum() > 0


def test_loss_is_smoothed_ce_on_fine_plus_kl() -> None:
    torch.manual_seed(1)
    coarse, fine, y = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([0, 2, 4])
    total, ce, kl = cfvit_loss(coarse, fine, y, label_smoothing=0.1)
    torch.testing.assert_close(ce, F.cross_entropy(fine, y, label_smoothing=0.1))
    torch.testing.assert_close(total, ce + kl)


@pytest.mark.parametrize("selection", [False, True])
def test_warmup_uses_all_fine_tokens_then_selection(selection: bool) -> None:
    model = _model(grid=7)
    cfg = model.config
    lengths: list[int] = []
    model.blocks[0].register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    coarse, fine = train_forward(model, torch.randn(2, 3, 224, 224), selection)
    assert (cfg.num_fine + 1, cfg.fine_seq_len) == (197, 125)
    assert coarse.shape == fine.shape == (2, 5)
    assert lengths == [cfg.num_coarse + 1, cfg.fine_seq_len if selection else cfg.num_fine + 1]


def test_a_few_steps_reduce_the_loss() -> None:
    model = _model(num_classes=3).train()
    optimizer = make_optimizer(model, TrainRecipe(lr=1e-3))
    torch.manual_seed(2)
    images, targets = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for step in range(12):
        loss, _, _ = cfvit_loss(*train_forward(model, images, selection=step >= 6), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    recipe = TrainRecipe(epochs=4, lr=1e-3, min_lr=1e-5, warmup_epochs=1)
    lrs = [lr_at(recipe, s, 10) for s in range(40)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": -1}, "--batch-size"),
        ({"arch": "resnet"}, "unknown arch"),
        ({"size": "huge"}, "unknown size"),
        ({"lr": 0.0}, "--lr"),
        ({"selection_after": -1}, "--selection-after"),
    ],
)
def test_recipe_rejects_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        TrainRecipe(**changes)


def test_checkpoint_round_trips_strictly_with_metadata(trained: Path) -> None:
    model = load_checkpoint(trained)  # strict, no flags: num_heads comes from the metadata
    meta = model.metadata  # type: ignore[attr-defined]
    cfg = model.config
    assert meta["class_names"] == sorted(CLASSES) and cfg.num_classes == len(CLASSES)
    assert (cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.coarse_grid) == ("deit", 48, 12, 3, 2)
    assert meta["gmacs"] == stage_gmacs(cfg).as_list()
    assert meta["preprocessing"]["crop_size"] == 64
    assert set(meta["val_accuracy"]) == {"coarse", "fine"}
    history = meta["history"]
    assert [h["epoch"] for h in history] == [1, 2] and [h["selection"] for h in history] == [False, True]
    for key in ("loss", "train_coarse_acc", "train_fine_acc", "val_coarse_acc", "val_fine_acc", "images_per_s"):
        assert all(isinstance(h[key], float) for h in history)
    assert meta["recipe"] == TINY.to_dict()
    assert "train_state" not in meta and "optimizer" not in str(list(meta))


def test_resume_continues_from_the_saved_epoch(data: Path, trained: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.pth"
    train(data, first, replace(TINY, epochs=1), progress=None)
    assert len(checkpoint_metadata(first)["history"]) == 1
    result = train(data, first, resume_recipe(first, epochs=2), resume=first, progress=None)
    assert [h["epoch"] for h in result.history] == [1, 2]
    resumed, straight = load_checkpoint(first).state_dict(), load_checkpoint(trained).state_dict()
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=1e-4)
    with pytest.raises(UsageError, match="already finished 2 epochs"):
        train(data, first, resume=first, progress=None)


def test_resume_needs_training_state(data: Path, tmp_path: Path) -> None:
    plain = save_checkpoint(_model(num_classes=10), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="no training state"):
        train(data, tmp_path / "out.pth", resume=plain, progress=None)


def test_init_keeps_backbone_and_refreshes_heads(data: Path, tmp_path: Path) -> None:
    source = _model(num_classes=len(CLASSES) + 1)
    path = save_checkpoint(source, tmp_path / "src.pth")
    result = train(data, tmp_path / "out.pth", replace(TINY, epochs=1, lr=1e-9, min_lr=0.0), init=path, progress=None)
    model = load_checkpoint(result.path)
    key = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(model.state_dict()[key], source.state_dict()[key])
    assert model.config.num_classes == len(CLASSES)
    with pytest.raises(UsageError, match="pick matching --arch/--size"):
        train(data, tmp_path / "o2.pth", replace(TINY, size="tiny"), init=path, progress=None)


def test_out_exists_needs_force(data: Path, trained: Path) -> None:
    with pytest.raises(UsageError, match="--force"):
        train(data, trained, TINY, progress=None)


def test_cli_train_end_to_end(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.pth"
    args = [
        "train",
        str(data),
        "--synthetic",
        "--coarse-grid",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "10",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert load_checkpoint(out).metadata["class_names"] == sorted(CLASSES)  # type: ignore[attr-defined]
    assert "val accuracy" in capsys.readouterr().out
    assert cli.main(args) == 2  # exists without --force
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--epochs", "0"],
        ["--batch-size", "0"],
        ["--arch", "resnet"],
        ["--size", "giant"],
        ["--lr", "-1"],
        ["--threads", "0"],
        ["--no-such-flag"],
    ],
)
def test_cli_train_bad_flags(data: Path, tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["train", str(data), "--out", str(tmp_path / "x.pth"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "x.pth").exists()


def test_cli_make_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["make-data", str(tmp_path / "d"), "--per-class", "2", "--image-size", "64"]) == 0
    assert len(list((tmp_path / "d" / "train").rglob("*.png"))) == 2 * len(CLASSES)
    assert cli.main(["make-data", str(tmp_path / "d"), "--per-class", "0"]) == 2


@pytest.mark.slow
def test_demo_recipe_reaches_the_promised_range(tmp_path: Path) -> None:
    """The demo recipe (a few minutes on 2 cores) lands at the range `cfvit demo` promises (fine top-1 >= 90%,
    >= 20 points above the coarse stage) on whatever CPU and thread count CI has, within a 5-point margin
    for a CPU nobody measured (benchmarks/results/demo_recipe/aligned/: 95.3-99.3% fine, 30.7-33.7 points
    over seeds 0-2 x 1/2 threads on an AMX Xeon; the version-4 set ended at 57-96% on the same recipe)."""
    val = train_demo(tmp_path).val
    assert val.fine_acc >= DEMO_EXPECTED_FINE - 0.05 and val.fine_acc - val.coarse_acc >= DEMO_EXPECTED_GAP - 0.05


def test_train_splits_flat_class_folders(data: Path, tmp_path: Path) -> None:
    result = train(data / "train", tmp_path / "flat.pth", replace(TINY, epochs=1), val_fraction=0.5, progress=None)
    assert len(result.val.labels) == len(CLASSES) and result.class_names == sorted(CLASSES)


def test_cli_synthetic_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine").mkdir()
    assert cli.main(["train", str(tmp_path / "mine"), "--synthetic", "--out", str(tmp_path / "m.pth")]) == 2
    assert "not a built-in synthetic set" in capsys.readouterr().err


@pytest.mark.parametrize("epochs, dense", [(1, 0), (2, 1), (3, 2), (30, 20)])
def test_default_recipe_keeps_at_least_one_selection_epoch(epochs: int, dense: int) -> None:
    """issue 13 item 14: `--epochs 2` used to run two warm-up epochs and never the informative selection."""
    recipe = TrainRecipe(epochs=epochs)
    assert recipe.dense_epochs == dense and recipe.selection_epochs == epochs - dense >= 1


def test_short_run_trains_the_selection_and_no_progress_keeps_epoch_lines(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--epochs 2` ends with a selection epoch; `--no-progress` hides bars only, not the per-epoch lines."""
    out = tmp_path / "m.pth"
    assert (
        cli.main(
            [
                "train",
                str(data),
                "--epochs",
                "2",
                "--batch-size",
                "10",
                "--coarse-grid",
                "2",
                "--no-progress",
                "--threads",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "epoch 1/2 warm-up" in err and "epoch 2/2 selection" in err
    assert "1 warm-up + 1 selection epoch(s)" in err
    history = checkpoint_metadata(out)["history"]
    assert [h["selection"] for h in history] == [False, True]


def test_no_selection_epoch_is_said(data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="cfvit_deploy.training"):
        train(data, tmp_path / "m.pth", replace(TINY, epochs=1, selection_after=1), progress=None)
    assert "no informative-selection epoch" in caplog.text and "--selection-after 1 >= --epochs 1" in caplog.text


def test_cli_checks_train_flags_before_generating_the_builtin_data(tmp_path: Path, capsys) -> None:
    """Issue 13 item 7: `--synthetic` generated the whole data set before `--threads 0` was refused."""
    code = cli.main(
        ["train", str(tmp_path / "data"), "--synthetic", "--threads", "0", "--out", str(tmp_path / "m.pth")]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --threads must be >= 1, got 0"
    assert not (tmp_path / "data").exists()


def test_training_reports_progress_through_the_hook_and_draws_nothing(
    data: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 21 item 4: training drew rich bars and printed its lines itself; now it calls the
    ProgressHook per batch and logs the header and epoch lines, and the CLI decides what to draw."""
    calls: list[tuple[str, int, int | None]] = []
    with caplog.at_level("INFO", logger="cfvit_deploy.training"):
        train(data, tmp_path / "m.pth", TINY, progress=lambda task, done, total: calls.append((task, done, total)))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    steps = -(-len(CLASSES) * 2 // TINY.batch_size)  # the fixture: 2 training images per class
    assert ("epoch 1/2 warm-up", steps, steps) in calls and ("epoch 2/2 selection", steps, steps) in calls
    assert calls[0] == ("epoch 1/2 warm-up", 0, steps)
    assert "1 warm-up + 1 selection epoch(s)" in caplog.text and "epoch 2/2 selection: loss" in caplog.text
