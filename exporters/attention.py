"""Export-only fused attention: each block's attention becomes one ``com.microsoft::MultiHeadAttention``.

PyTorch's own model keeps its explicit softmax (it is bit-exact against the upstream code and the
coarse stage needs the maps). Only while a graph wrapper is traced, :func:`attention_mode` swaps each
block's :class:`~cfvit_deploy.layers.Attention` forward for :func:`fused_forward`:

* ``qkv`` (one MatMul, as before) is split into q, k, v in (batch, tokens, heads*head_dim) layout, the
  input layout of ONNX Runtime's contrib ``MultiHeadAttention`` (num_heads and scale attributes), which
  runs QKᵀ, softmax and ·V in one kernel without materialising the (B, heads, N, N) map in the graph;
* the coarse stage's class attention needs only the class token's row of each map: it is computed
  directly as softmax(q_cls·Kᵀ·scale) over all keys (B, heads, 1, N), with the model's own scaling
  order, and the model's EMA code then takes ``[:, :, 0, 1:]`` of it exactly as of the full map. Blocks
  whose row is unused (blocks before the EMA, the fine and baseline graphs) lose it to dead-code
  elimination at export.

In PyTorch (during tracing) the custom op's forward computes the same attention with plain ops, so the
traced shapes and values are the model's.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from cfvit_deploy.layers import Attention
from cfvit_deploy.manifest import ATTENTION_KINDS

#: ``--attention`` choices: one contrib MultiHeadAttention node per block, or the explicit MatMul/Softmax chain.
ATTENTION_MODES = ATTENTION_KINDS
#: What ``cfvit export`` uses without ``--attention``: the one measured faster. On the shared 2-core
#: development machine wall-clock A/Bs were noise; single-thread CPU time per call (DeiT-S size) was equal
#: at batch 1 and 3-6% higher for fused at batch 8, so plain stays the default until
#: ``benchmarks/attention_ab.py`` on a quiet machine says otherwise (then flip this one constant).
DEFAULT_ATTENTION = "plain"
#: The contrib-op domain and version the fused graphs import (ONNX Runtime; OpenVINO's ONNX reader knows it too).
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPSET = {CONTRIB_DOMAIN: 1}


class _MultiHeadAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale) v per head, exported as one ``com.microsoft::MultiHeadAttention`` node."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float) -> Tensor:  # noqa: ARG004
        b, n, c = q.shape
        split = lambda t: t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)  # noqa: E731
        attn = ((split(q) @ split(k).transpose(-2, -1)) * scale).softmax(dim=-1)
        return (attn @ split(v)).transpose(1, 2).reshape(b, n, c)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, scale: float):  # noqa: ANN001, ANN205 (torch.onnx graph values)
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=scale)
        out.setType(q.type())
        return out


def fused_forward(self: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Attention.forward with one fused node; returns (projected output, class-token rows (B, heads, 1, N))."""
    # token count and width are static in every graph (only the batch is dynamic): Python ints and -1 for
    # the batch keep shape arithmetic (Shape/Gather/Concat nodes) out of the graph
    n, c = int(x.shape[1]), int(x.shape[2])
    h, d = self.num_heads, int(x.shape[2]) // self.num_heads
    q, k, v = self.qkv(x).split(c, dim=-1)  # (B, N, C) each, heads*head_dim layout (qkv is [q | k | v])
    # the explicit reshape gives the contrib node's output a static shape for onnx shape inference (it
    # does not know com.microsoft ops), so the projection after it needs no runtime shape arithmetic
    out = _MultiHeadAttention.apply(q, k, v, h, float(self.scale)).reshape(-1, n, c)
    q_cls = q[:, :1].reshape(-1, h, 1, d)  # (B, 1, h*d) and (B, h, 1, d) share one memory order
    keys = k.reshape(-1, n, h, d).transpose(1, 2)  # (B, h, N, d)
    if self.scale_query:  # the model's own order of scaling (LV-ViT scales q, DeiT the product)
        logits = (q_cls * self.scale) @ keys.transpose(-2, -1)
    else:
        logits = (q_cls @ keys.transpose(-2, -1)) * self.scale
    return self.proj(out), logits.softmax(dim=-1)


@contextlib.contextmanager
def attention_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Within the block, every :class:`Attention` of `model` runs as `mode` ("fused" or "plain")."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose one of {', '.join(ATTENTION_MODES)}")
    if mode == "plain":
        yield
        return
    patched = [m for m in model.modules() if isinstance(m, Attention)]
    for m in patched:
        m.forward = types.MethodType(fused_forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward  # back to the class's forward
