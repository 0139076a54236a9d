"""Train a CF-ViT on an image folder with the paper's objective (eq. 14).

``loss = CE_smooth(fine, y) + KL(p_fine || p_coarse)`` with the fine output detached, so the
coarse stage learns only through the KL term and the shared weights. For LV-ViT both terms use
the model's logits (cls + aux mix); token labelling and the cls-only KL of the original are left out.

The fine stage sees all 4g² fine tokens (with the fine position embedding) for the first
``selection_after`` epochs, then the informative selection of :meth:`CFViT.forward`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .checkpoints import CHECKPOINT_FORMAT, META_KEY, load_checkpoint
from .config import ModelConfig
from .cores import usable_threads
from .data.folder import FolderSplits, ImageFolderDataset, find_splits
from .data.synthetic import SyntheticSpec, make_synthetic_dataset, read_meta
from .errors import CheckpointError, UsageError
from .flops import stage_gmacs
from .io import atomic_write_path, check_output
from .model import CFViT
from .preprocessing import PreprocessConfig
from .progress import ProgressHook, report
from .training_recipe import (  # noqa: F401  (re-exported: cfvit_deploy.training is the public module)
    DEMO_DATA,
    DEMO_RECIPE,
    TRAIN_STATE_KEY,
    EvalResult,
    TrainRecipe,
    TrainResult,
)

log = logging.getLogger(__name__)


def cfvit_loss(
    coarse_logits: Tensor, fine_logits: Tensor, targets: Tensor, label_smoothing: float = 0.1
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, ce, kl): label-smoothed CE on the fine logits + KL(p_fine || p_coarse), fine detached."""
    ce = F.cross_entropy(fine_logits, targets, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(coarse_logits, dim=-1), F.softmax(fine_logits.detach(), dim=-1), reduction="batchmean")
    return ce + kl, ce, kl


def train_forward(model: CFViT, images: Tensor, selection: bool) -> tuple[Tensor, Tensor]:
    """(coarse, fine) logits: fine on all fine tokens (warm-up) or on the informative selection."""
    c = model.coarse_stage(images)
    if not selection:
        return c.logits, model.fine_stage_dense(images, c.features)
    inf, uninf = model.select(c.score)
    return c.logits, model.fine_stage(images, c.features, c.embedding, inf, uninf)


def lr_at(recipe: TrainRecipe, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine decay reaching `min_lr` at the last step."""
    warm = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm - 1)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: CFViT, recipe: TrainRecipe) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, position embeddings and the cls token."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if p.ndim <= 1 or name.startswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, eps=1e-8)


@torch.no_grad()
def evaluate(model: CFViT, dataset: ImageFolderDataset, batch_size: int = 128) -> EvalResult:
    """Coarse and fine logits of every image (model in eval mode, informative selection)."""
    was_training = model.training
    model.eval()
    coarse, fine = [], []
    for images, _ in DataLoader(dataset, batch_size=batch_size):
        out = model(images)
        coarse.append(out.coarse_logits.numpy())
        fine.append(out.fine_logits.numpy())
    model.train(was_training)
    return EvalResult(np.concatenate(coarse), np.concatenate(fine), np.asarray(dataset.labels))


def default_threads() -> int:
    """Intra-op threads for training: the cores this process may use that are idle now (at least 1).

    On a shared machine, more threads than idle cores make every parallel region wait for a
    descheduled thread, which is many times slower than one thread. "Now" is a short sample of
    /proc/stat (:func:`cfvit_deploy.cores.usable_threads`), not the load average, which still counts
    the work that finished just before (a benchmark part, an export).
    """
    return usable_threads()


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[int]:
    """Run with `n` intra-op threads (None: $OMP_NUM_THREADS if set, else :func:`default_threads`)."""
    previous = torch.get_num_threads()
    if n is None:
        n = previous if "OMP_NUM_THREADS" in os.environ else default_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def _init_weights(model: CFViT, path: Path) -> None:
    """Copy a checkpoint's weights; the classifier heads are kept fresh when the class count differs."""
    cfg = model.config
    source = load_checkpoint(path)  # heads from the file (a different count would be refused); weights only
    s = source.config
    if (s.arch, s.embed_dim, s.depth, s.coarse_grid) != (cfg.arch, cfg.embed_dim, cfg.depth, cfg.coarse_grid):
        raise UsageError(
            f"--init {path} is {s.arch} embed {s.embed_dim} depth {s.depth} g={s.coarse_grid}, but the run is "
            f"{cfg.arch} embed {cfg.embed_dim} depth {cfg.depth} g={cfg.coarse_grid}: pick matching --arch/--size"
        )
    state = source.state_dict()
    if s.num_classes != cfg.num_classes:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "aux_head."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("head.", "aux_head.")) for k in missing), (missing, unexpected)


def _load_resume(path: Path, recipe: TrainRecipe | None) -> tuple[CFViT, dict[str, Any], dict[str, Any], TrainRecipe]:
    model = load_checkpoint(path)
    meta: dict[str, Any] = model.metadata  # type: ignore[attr-defined]
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get(TRAIN_STATE_KEY)
    if not isinstance(state, dict) or "recipe" not in meta:
        raise CheckpointError(f"{path} holds no training state to resume (not written by `cfvit train`); use --init")
    stored = TrainRecipe.from_dict(meta["recipe"])
    recipe = recipe or stored
    if (recipe.arch, recipe.size, recipe.coarse_grid) != (stored.arch, stored.size, stored.coarse_grid):
        raise UsageError(
            f"--resume {path} was trained as {stored.arch}/{stored.size} g={stored.coarse_grid}; "
            "the model cannot change when resuming"
        )
    if state["epoch"] >= recipe.epochs:
        raise UsageError(f"{path} already finished {state['epoch']} epochs; pass more --epochs to continue")
    return model.train(), meta, state, recipe


def _save(path: Path, model: CFViT, meta: dict[str, Any], state: dict[str, Any]) -> None:
    payload = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        META_KEY: {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), **meta},
        TRAIN_STATE_KEY: state,
    }
    with atomic_write_path(path) as tmp:
        torch.save(payload, tmp)


def check_train_args(
    out: Path, init: str | Path | None, resume: str | Path | None, threads: int | None, force: bool
) -> None:
    """The flag checks of :func:`train`, cheap and before any work (the CLI runs them before it
    generates the built-in data for ``--synthetic``)."""
    if init is not None and resume is not None:
        raise UsageError("pass either --init or --resume, not both")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if resume is None or Path(out).resolve() != Path(resume).resolve():
        check_output(Path(out), force)


def train(
    data_dir: str | Path,
    out: str | Path,
    recipe: TrainRecipe | None = None,
    *,
    init: str | Path | None = None,
    resume: str | Path | None = None,
    val_fraction: float | None = None,
    force: bool = False,
    progress: ProgressHook | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Train a CF-ViT on `data_dir` (``train/`` + ``val/``, or class folders split by `val_fraction`).

    The checkpoint `out` is rewritten atomically after every epoch, so an interrupted run continues
    with ``resume=out`` (its stored recipe, unless `recipe` is given; only `epochs` and the
    optimisation settings may change). `init` starts from another checkpoint's weights.
    `threads` sets torch's intra-op threads (default: the idle cores, see :func:`default_threads`).
    `progress` is called after every batch (task ``epoch E/N phase``); the header and one line per
    epoch go to this module's logger (INFO). Nothing is drawn or printed here.
    """
    hook = progress if callable(progress) else None  # progress=False/True of older callers: no hook
    out = Path(out)
    check_train_args(out, init, resume, threads, force)
    model, meta, state, recipe, splits = _start(data_dir, recipe, init, resume, val_fraction)
    cfg = model.config
    pp = PreprocessConfig.for_model(cfg)
    train_set = ImageFolderDataset(splits.train, pp, train=True, seed=recipe.seed, crop_scale=recipe.crop_scale)
    val_set = ImageFolderDataset(splits.val, pp, train=False)
    optimizer = make_optimizer(model, recipe)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    history: list[dict[str, Any]] = list(meta.get("history", []))
    steps_per_epoch = math.ceil(len(train_set) / recipe.batch_size)
    step, start = int(state["step"]), time.perf_counter()
    val = None
    if recipe.selection_epochs == 0:
        log.warning(
            "no informative-selection epoch: --selection-after %d >= --epochs %d, so the fine stage is "
            "trained only on all fine tokens; pass --selection-after below --epochs",
            recipe.dense_epochs,
            recipe.epochs,
        )
    with _threads(threads) as n_threads:
        log.info(
            "training on %d images (%d classes), validating on %d; %d torch thread(s); "
            "%d warm-up + %d selection epoch(s)",
            len(train_set),
            len(splits.classes),
            len(val_set),
            n_threads,
            recipe.dense_epochs,
            recipe.selection_epochs,
        )
        for epoch in range(int(state["epoch"]), recipe.epochs):
            selection = epoch >= recipe.dense_epochs
            stats = _train_epoch(model, train_set, optimizer, recipe, epoch, step, steps_per_epoch, selection, hook)
            stats["threads"] = n_threads
            step += steps_per_epoch
            val = evaluate(model, val_set, 2 * recipe.batch_size)
            stats.update(val_coarse_acc=val.coarse_acc, val_fine_acc=val.fine_acc)
            history.append(stats)
            log.info("%s", _epoch_line(stats, recipe.epochs))
            meta = _metadata(recipe, splits.classes, pp, cfg, val, history, data_dir, len(train_set))
            _save(out, model, meta, {"epoch": epoch + 1, "step": step, "optimizer": optimizer.state_dict()})
    assert val is not None
    return TrainResult(out, splits.classes, history, val, time.perf_counter() - start)


def _start(
    data_dir: str | Path,
    recipe: TrainRecipe | None,
    init: str | Path | None,
    resume: str | Path | None,
    val_fraction: float | None,
) -> tuple[CFViT, dict[str, Any], dict[str, Any], TrainRecipe, FolderSplits]:
    """The model to train (new, from `init`'s weights, or resumed with its metadata, training state and
    recipe) and the data splits."""
    meta: dict[str, Any] = {}
    state: dict[str, Any] = {"epoch": 0, "step": 0}
    if resume is not None:
        model, meta, state, recipe = _load_resume(Path(resume), recipe)
    recipe = recipe or TrainRecipe()
    splits = find_splits(data_dir, val_fraction, recipe.seed)
    if resume is not None and meta.get("class_names") != splits.classes:
        raise UsageError(f"the classes of {data_dir} differ from those the resumed run was trained on")
    if resume is None:
        torch.manual_seed(recipe.seed)
        model = CFViT(recipe.model_config(len(splits.classes)), drop_path_rate=recipe.drop_path).train()
        if init is not None:
            _init_weights(model, Path(init))
    return model, meta, state, recipe, splits


def _train_epoch(
    model: CFViT,
    dataset: ImageFolderDataset,
    optimizer: torch.optim.Optimizer,
    recipe: TrainRecipe,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    selection: bool,
    progress: ProgressHook | None,
) -> dict[str, Any]:
    dataset.set_epoch(epoch)
    order = np.random.default_rng([recipe.seed, epoch]).permutation(len(dataset)).tolist()
    loader = DataLoader(dataset, batch_size=recipe.batch_size, sampler=order)
    phase = "selection" if selection else "warm-up"
    task = f"epoch {epoch + 1}/{recipe.epochs} {phase}"
    report(progress, task, 0, steps_per_epoch)
    sums = dict(loss=0.0, ce=0.0, kl=0.0, coarse=0.0, fine=0.0)
    seen, start = 0, time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step + i, steps_per_epoch)
        coarse, fine = train_forward(model, images, selection)
        loss, ce, kl = cfvit_loss(coarse, fine, targets, recipe.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(targets)
        seen += n
        for key, value in (("loss", loss), ("ce", ce), ("kl", kl)):
            sums[key] += float(value.detach()) * n
        sums["coarse"] += float((coarse.argmax(1) == targets).sum())
        sums["fine"] += float((fine.argmax(1) == targets).sum())
        report(progress, task, i + 1, steps_per_epoch)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "selection": selection,
        "lr": optimizer.param_groups[0]["lr"],
        "loss": sums["loss"] / seen,
        "ce": sums["ce"] / seen,
        "kl": sums["kl"] / seen,
        "train_coarse_acc": sums["coarse"] / seen,
        "train_fine_acc": sums["fine"] / seen,
        "images_per_s": seen / seconds,
        "seconds": seconds,
    }


def _epoch_line(stats: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {stats['epoch']}/{epochs} {'selection' if stats['selection'] else 'warm-up'}: "
        f"loss {stats['loss']:.3f} (ce {stats['ce']:.3f} kl {stats['kl']:.3f})  "
        f"train coarse {stats['train_coarse_acc']:.1%} fine {stats['train_fine_acc']:.1%}  "
        f"val coarse {stats['val_coarse_acc']:.1%} fine {stats['val_fine_acc']:.1%}  "
        f"{stats['images_per_s']:.0f} img/s, {stats['seconds']:.0f} s"
    )


def _metadata(
    recipe: TrainRecipe,
    classes: list[str],
    pp: PreprocessConfig,
    cfg: ModelConfig,
    val: EvalResult,
    history: list[dict[str, Any]],
    data_dir: str | Path,
    n_train: int,
) -> dict[str, Any]:
    synthetic = read_meta(Path(data_dir))
    return {
        "class_names": list(classes),
        "preprocessing": pp.to_dict(),
        "val_accuracy": {"coarse": val.coarse_acc, "fine": val.fine_acc},
        "gmacs": stage_gmacs(cfg).as_list(),
        "recipe": recipe.to_dict(),
        "history": list(history),
        "data": {"dir": str(data_dir), "train_images": n_train, "val_images": len(val.labels), "synthetic": synthetic},
    }


def resume_recipe(path: str | Path, **changes: Any) -> TrainRecipe:
    """The recipe stored in a `cfvit train` checkpoint, with `changes` applied (e.g. more epochs)."""
    meta = load_checkpoint(path).metadata  # type: ignore[attr-defined]
    if "recipe" not in meta:
        raise CheckpointError(f"{path} holds no training recipe (not written by `cfvit train`)")
    return replace(TrainRecipe.from_dict(meta["recipe"]), **changes)


def train_demo(
    workdir: str | Path,
    force: bool = False,
    progress: ProgressHook | None = None,
    spec: SyntheticSpec = DEMO_DATA,
    recipe: TrainRecipe = DEMO_RECIPE,
) -> TrainResult:
    """Generate `spec` (default :data:`DEMO_DATA`) in ``workdir/data`` (reused if present) and train
    `recipe` (default :data:`DEMO_RECIPE`) to ``workdir/cfvit-demo.pth``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_synthetic_dataset(workdir / "data", **asdict(spec), force=force)
    return train(data, workdir / "cfvit-demo.pth", recipe, force=force, progress=progress)
