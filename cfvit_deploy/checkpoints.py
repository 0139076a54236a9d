"""Load official CF-ViT checkpoints and this project's own, strictly and without unpickling code."""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import pickletools
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import _torch_guard  # noqa: F401  # isort: skip  (no torch: one error line naming the extra)
import torch
from torch import Tensor

from .checks import check_choice, check_positive_int
from .config import ModelConfig
from .errors import CheckpointError, UnreadableCheckpointError, UsageError
from .io import atomic_write_path
from .model import CFViT

#: Top-level keys under which a state_dict may sit, in order of preference.
STATE_KEYS = ("model", "state_dict", "state_dict_ema", "model_ema")
#: The keys that hold an exponential moving average of the weights (timm's ModelEma savers).
EMA_KEYS = ("state_dict_ema", "model_ema")
#: Choices of `load_checkpoint(weights=...)` / `--weights`.
WEIGHTS = ("auto", "model", "ema")
#: Heads of the official files when nothing else says: both released factories use 6.
DEFAULT_HEADS = 6
#: (embed_dim, heads) of the original code's two factories (cfvit-upstream-spec.md).
FACTORY_HEADS = {"cf_deit_small": (384, 6), "cf_lvvit_small": (384, 6)}
#: (embed_dim, heads) of DeiT/ViT sizes by name (timm's deit_*/vit_* models).
SIZE_HEADS = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12), "large": (1024, 16)}
#: Key of this project's metadata inside a checkpoint (plain types only).
META_KEY = "cfvit_deploy"
CHECKPOINT_FORMAT = 1
log = logging.getLogger(__name__)


#: Classes allowed besides tensors and containers: the training scripts' `args` (a plain namespace
#: of options; rebuilding one sets attributes, it runs no code).
SAFE_GLOBALS = [argparse.Namespace]


def _read(path: Path) -> Any:
    if not path.exists():
        raise UnreadableCheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UnreadableCheckpointError(f"checkpoint path is a directory, not a file: {path}")
    try:
        with warnings.catch_warnings():  # raw pickles make torch warn before it refuses them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        culprit = _pickled_global(str(exc), path)
        if culprit:
            raise UnreadableCheckpointError(
                f"refusing to load {path}: it contains Python objects that would run code when unpickled "
                f"({culprit}); only plain tensors and containers are accepted"
            ) from None
        raise _unreadable(path) from None
    except Exception:  # torch.load raises many types for garbage (KeyError, RuntimeError, ...)
        raise _unreadable(path) from None


def _unreadable(path: Path) -> UnreadableCheckpointError:
    """The error for a file torch cannot load: text and random bytes are not checkpoints at all; an
    empty file, a damaged zip or pickle may be a checkpoint cut short."""
    looks = describe_file(path)
    if looks.startswith(("a text file", "binary data")):
        return UnreadableCheckpointError(f"not a PyTorch checkpoint: {path} is {looks}")
    return UnreadableCheckpointError(f"not a readable PyTorch checkpoint (corrupt or truncated?): {path} is {looks}")


def describe_file(path: Path) -> str:
    """What a file that torch cannot load looks like: empty, text, a zip archive, a pickle, or binary data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return f"a zip archive of {size:,} bytes that torch cannot read (truncated, or not made by torch.save)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return f"a pickle of {size:,} bytes that ends early or is damaged (truncated?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    if text and printable >= 0.95 * len(text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"a text file ({size:,} bytes, starting {first!r})"
    return f"binary data of {size:,} bytes that is not a PyTorch checkpoint (random or damaged bytes)"


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


def _pick_state(obj: Mapping[str, Any], weights: str) -> tuple[Any, str]:
    """The mapping that holds the weights, and its top-level key ("" for a bare state_dict).

    `weights`: "model" (the trained weights), "ema" (the EMA copy) or "auto": the EMA copy of a timm
    CheckpointSaver file (``state_dict`` + ``state_dict_ema``: timm ranks those checkpoints by the EMA's
    metric), the trained weights otherwise (DeiT's ``model_ema`` is never evaluated by its scripts).
    """
    check_choice(weights, WEIGHTS, "weights")
    present = [k for k in STATE_KEYS if isinstance(obj.get(k), Mapping)]
    trained = [k for k in present if k not in EMA_KEYS]
    ema = [k for k in present if k in EMA_KEYS]
    if not present:
        return obj, ""
    if weights == "ema" and not ema:
        raise CheckpointError(f"the checkpoint holds no EMA weights (it has {', '.join(present)}); use --weights model")
    if weights == "model" and not trained:
        raise CheckpointError(f"the checkpoint holds only EMA weights ({', '.join(ema)}); use --weights ema")
    if weights == "auto":
        timm_saver = "state_dict" in trained and "state_dict_ema" in ema
        key = "state_dict_ema" if timm_saver else (trained or ema)[0]
    else:
        key = (ema if weights == "ema" else trained)[0]
    return obj[key], key


def extract_state_dict(obj: Any, weights: str = "auto") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state_dict (``module.`` prefix removed) and this project's metadata (or {}).

    The metadata also gets ``weights_key``: the top-level key the tensors came from ("" when bare).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    meta = dict(obj.get(META_KEY, {})) if isinstance(obj.get(META_KEY), Mapping) else {}
    state, key = _pick_state(obj, weights)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(
            f"no tensors found in the checkpoint (top-level keys: {', '.join(map(str, list(obj)[:10]))})"
        )
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    meta["weights_key"] = key
    return tensors, meta


def heads_evidence(obj: Any, meta: Mapping[str, Any], embed_dim: int) -> list[tuple[int, str]]:
    """What the file says about the number of heads: [(heads, where it says so)].

    Sources: the config cfvit-deploy recorded, and the model name of the original training scripts
    (``args.model`` of DeiT's saver, ``arch``/``args.model`` of timm's) when its width matches the tensors.
    """
    found: list[tuple[int, str]] = []
    recorded = meta.get("config")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("num_heads"), int):
        found.append((int(recorded["num_heads"]), "the config recorded in the checkpoint"))
    names: list[tuple[str, str]] = []
    if isinstance(obj, Mapping):
        args = obj.get("args")
        model_name = args.get("model") if isinstance(args, Mapping) else getattr(args, "model", None)
        if isinstance(model_name, str):
            names.append((model_name, "args.model"))
        if isinstance(obj.get("arch"), str):
            names.append((obj["arch"], "arch"))
    for name, where in names:
        known = model_heads(name)
        if known is not None and known[0] == embed_dim:
            found.append((known[1], f"its training {where} {name!r}"))
    return found


def model_heads(name: str) -> tuple[int, int] | None:
    """(embed_dim, heads) of a model name of the original code or timm, or None if unknown."""
    if name in FACTORY_HEADS:
        return FACTORY_HEADS[name]
    match = re.search(r"(?:^|_)(tiny|small|base|large)(?:_|$)", name)
    return SIZE_HEADS[match.group(1)] if match and re.search(r"deit|vit", name) else None


def resolve_num_heads(num_heads: Any, evidence: list[tuple[int, str]], embed_dim: int) -> int:
    """The number of heads: the argument, checked against everything the file says, else the file's, else 6."""
    if num_heads is not None:
        num_heads = check_positive_int(num_heads, "num_heads")  # 0 must not mean "default"
        for value, where in evidence:
            if value != num_heads:
                raise UsageError(
                    f"num_heads {num_heads} contradicts the checkpoint: {where} says {value} heads; "
                    f"pass {value} or leave num_heads out"
                )
    values = sorted({v for v, _ in evidence})
    if len(values) > 1:
        raise CheckpointError(
            "the checkpoint contradicts itself about the number of heads: "
            + "; ".join(f"{where} says {v}" for v, where in evidence)
        )
    heads = num_heads or (values[0] if values else DEFAULT_HEADS)
    if embed_dim % heads:
        raise UsageError(f"num_heads {heads} does not divide the checkpoint's width (embed_dim {embed_dim})")
    return heads


def infer_config(state: Mapping[str, Tensor], num_heads: int | None = None, **overrides: Any) -> ModelConfig:
    """Derive the model config from tensor names and shapes (num_heads cannot be derived)."""
    if "patch_embed.proj.weight" not in state or "pos_embed_list.0" not in state:
        if "pos_embed" in state:
            raise CheckpointError(
                "checkpoint is a plain ViT/DeiT (single pos_embed, no pos_embed_list.0/1), not a CF-ViT: "
                "cfvit-deploy exports CF-ViT models only; train one with `cfvit train` (or fine-tune these "
                "weights into a CF-ViT with the original CF-ViT code) and export that"
            )
        missing = [k for k in ("patch_embed.proj.weight", "pos_embed_list.0", "pos_embed_list.1") if k not in state]
        raise CheckpointError(f"checkpoint is not a CF-ViT: missing {', '.join(missing)}")
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
        num_heads=resolve_num_heads(num_heads, [], embed_dim),
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
    path: str | Path, num_heads: int | None = None, config: ModelConfig | None = None, weights: str = "auto"
) -> CFViT:
    """Load an official or own CF-ViT checkpoint strictly; returns an eval-mode model.

    The config is inferred from the tensors. The number of heads cannot be: it comes from `num_heads`,
    the config the file records, or the model name in its training args, and any two of these that
    disagree are refused (so are 0, negative values and values that do not divide the width); with
    none of them it is 6. Pass `config` to force one; any disagreement with the tensors or with what the
    file says about heads is an error. `weights` picks "model", "ema" or "auto" (see :func:`_pick_state`);
    the key loaded is in ``model.metadata["weights_key"]``.
    """
    path = Path(path)
    raw = _read(path)
    state, meta = extract_state_dict(raw, weights)
    if config is None:
        recorded = meta.get("config")
        if isinstance(recorded, Mapping):
            try:
                base = ModelConfig.from_dict(dict(recorded))
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint metadata holds an invalid model config: {exc}") from None
            heads = resolve_num_heads(num_heads, heads_evidence(raw, meta, base.embed_dim), base.embed_dim)
            config = replace(base, num_heads=heads)
        else:
            proj = state.get("patch_embed.proj.weight")
            width = int(proj.shape[0]) if proj is not None and proj.ndim and "pos_embed_list.0" in state else 0
            heads = resolve_num_heads(num_heads, heads_evidence(raw, meta, width), width) if width else num_heads
            config = infer_config(state, heads)
    else:
        for value, where in heads_evidence(raw, meta, config.embed_dim):
            if value != config.num_heads:
                raise CheckpointError(f"the model config says {config.num_heads} heads but {where} says {value}")
    model = CFViT(config)
    _check_keys(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not load strictly: {str(exc).splitlines()[0]}") from None
    if meta["weights_key"] in EMA_KEYS or any(isinstance(raw.get(k), Mapping) for k in EMA_KEYS):
        log.info(
            "loaded the %s weights (%s) of %s",
            "EMA" if meta["weights_key"] in EMA_KEYS else "trained",
            meta["weights_key"],
            path,
        )
    model.metadata = dict(meta)  # type: ignore[attr-defined]
    model.source_path = str(path.resolve())  # type: ignore[attr-defined]
    return model.eval()


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """This project's metadata stored in a checkpoint ({} for official files)."""
    meta = extract_state_dict(_read(Path(path)))[1]
    meta.pop("weights_key", None)
    return meta


def save_checkpoint(model: CFViT, path: str | Path, **metadata: Any) -> Path:
    """Save in the official layout ``{"model": state_dict}`` plus plain-typed metadata, atomically."""
    meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), **metadata}
    payload = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, META_KEY: meta}
    with atomic_write_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)
