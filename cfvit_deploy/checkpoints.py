"""Load official CF-ViT checkpoints and this project's own, strictly and without unpickling code."""

from __future__ import annotations

import argparse
import math
import pickle
import pickletools
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CheckpointError
from .io import atomic_write_path
from .model import CFViT

#: Top-level keys under which a state_dict may sit, in order of preference.
STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")
#: Key of this project's metadata inside a checkpoint (plain types only).
META_KEY = "cfvit_deploy"
CHECKPOINT_FORMAT = 1


#: Classes allowed besides tensors and containers: the training scripts' `args` (a plain namespace
#: of options; rebuilding one sets attributes, it runs no code).
SAFE_GLOBALS = [argparse.Namespace]


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        with warnings.catch_warnings():  # raw pickles make torch warn before it refuses them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = _pickled_global(str(exc), path)
        if culprit:
            raise CheckpointError(
                f"refusing to load {path}: it contains Python objects that would run code when unpickled "
                f"({culprit}); only plain tensors and containers are accepted"
            ) from None
        operand = re.search(r"Unsupported operand \d+", str(exc))
        first = operand.group(0) if operand else (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise CheckpointError(f"not a PyTorch checkpoint (unpickling failed): {path}: {first[:160]}") from None
    except Exception as exc:  # torch.load raises many types for garbage (KeyError, RuntimeError, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"not a readable PyTorch checkpoint (corrupt or truncated?): {path}: {msg[:200]}") from None


def _pickled_global(message: str, path: Path) -> str | None:
    """The callable (module.name) a refused pickle would import, or None (random bytes, text, ...).

    Taken from torch's refusal when it names one; otherwise the file's opcodes are read with
    pickletools, which only parses them (nothing is imported or run).
    """
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:
        return named.group(1)
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL":
                    return ".".join(strings[-2:])
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a well-formed pickle: pickletools raises ValueError and others
        return None
    return None


def extract_state_dict(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state_dict (``module.`` prefix removed) and this project's metadata (or {})."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    meta = obj.get(META_KEY, {}) if isinstance(obj.get(META_KEY), Mapping) else {}
    state: Any = obj
    for key in STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            state = obj[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"no tensors found in the checkpoint (top-level keys: {', '.join(map(str, list(obj)[:10]))})"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors, dict(meta)


def infer_config(state: Mapping[str, Tensor], num_heads: int | None = None, **overrides: Any) -> ModelConfig:
    """Derive the model config from tensor names and shapes (num_heads cannot be derived)."""
    if "patch_embed.proj.weight" not in state or "pos_embed_list.0" not in state:
        looks = "a plain ViT/DeiT (single pos_embed)" if "pos_embed" in state else "not a CF-ViT"
        missing = [k for k in ("patch_embed.proj.weight", "pos_embed_list.0", "pos_embed_list.1") if k not in state]
        raise CheckpointError(f"checkpoint is {looks}: missing {', '.join(missing)}")
    arch = "lvvit" if "patch_embed.conv1.weight" in state else "deit"
    embed_dim = int(state["patch_embed.proj.weight"].shape[0])
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise CheckpointError(f"checkpoint looks like {arch} but has no transformer blocks (blocks.*)")
    n_coarse = int(state["pos_embed_list.0"].shape[1]) - 1
    grid = math.isqrt(n_coarse)
    if grid * grid != n_coarse:
        raise CheckpointError(f"pos_embed_list.0 has {n_coarse} patch slots, which is not a square grid")
    hidden = state.get("blocks.0.mlp.fc1.weight")
    head = state.get("head.weight")
    if hidden is None or head is None:
        raise CheckpointError(f"checkpoint looks like {arch} but lacks blocks.0.mlp.fc1.weight or head.weight")
    ratio = hidden.shape[0] / embed_dim
    values: dict[str, Any] = dict(
        arch=arch,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads or 6,
        mlp_ratio=int(ratio) if ratio == int(ratio) else ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        num_classes=int(head.shape[0]),
        coarse_grid=grid,
    )
    values.update(overrides)
    try:
        return ModelConfig(**values)
    except ValueError as exc:
        raise CheckpointError(f"inferred an invalid config ({arch}, embed_dim {embed_dim}): {exc}") from None


def _check_keys(model: CFViT, state: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}{', ...' if len(unexpected) > 5 else ''})"
        )
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if problems:
        cfg = model.config
        raise CheckpointError(
            f"checkpoint does not match CF-ViT {cfg.arch} (embed {cfg.embed_dim}, depth {cfg.depth}, "
            f"g={cfg.coarse_grid}): " + "; ".join(problems)
        )


def load_checkpoint(
    path: str | Path, num_heads: int | None = None, config: ModelConfig | None = None
) -> CFViT:
    """Load an official or own CF-ViT checkpoint strictly; returns an eval-mode model.

    The config is inferred from the tensors (num_heads from the file's metadata, the argument, or 6).
    Pass `config` to force one; any disagreement with the tensors is a :class:`CheckpointError`.
    """
    path = Path(path)
    state, meta = extract_state_dict(_read(path))
    if config is None:
        recorded = meta.get("config")
        if isinstance(recorded, Mapping):
            try:
                config = ModelConfig.from_dict({**recorded, **({"num_heads": num_heads} if num_heads else {})})
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint metadata holds an invalid model config: {exc}") from None
        else:
            config = infer_config(state, num_heads)
    model = CFViT(config)
    _check_keys(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not load strictly: {str(exc).splitlines()[0]}") from None
    model.metadata = dict(meta)  # type: ignore[attr-defined]
    model.source_path = str(path.resolve())  # type: ignore[attr-defined]
    return model.eval()


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """This project's metadata stored in a checkpoint ({} for official files)."""
    return extract_state_dict(_read(Path(path)))[1]


def save_checkpoint(model: CFViT, path: str | Path, **metadata: Any) -> Path:
    """Save in the official layout ``{"model": state_dict}`` plus plain-typed metadata, atomically."""
    meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), **metadata}
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, META_KEY: meta}
    with atomic_write_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)
