"""The PyTorch CF-ViT reproduces the original code (fixtures) and keeps its contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfvit_deploy import ModelConfig, load_checkpoint
from cfvit_deploy.model import CFViT, confidence, fine_indices


def test_matches_upstream_outputs(upstream):
    model = load_checkpoint(upstream.pth, num_heads=upstream.num_heads)
    ref = upstream.ref
    with torch.no_grad():
        out = model(torch.from_numpy(ref["fine_images"]))
    np.testing.assert_allclose(out.coarse_logits.numpy(), ref["coarse_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.fine_logits.numpy(), ref["fine_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.score.numpy(), ref["score"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.informative_idx.numpy(), ref["informative_idx"])
    np.testing.assert_array_equal(out.uninformative_idx.numpy(), ref["uninformative_idx"])
    np.testing.assert_allclose(confidence(out.coarse_logits).numpy(), ref["coarse_confidence"], atol=1e-5)
    assert out.score.dtype == torch.float32 and out.informative_idx.dtype == torch.int64
    assert out.informative_idx.shape == (len(ref["fine_images"]), model.config.k)


def test_config_inferred_from_tensors(upstream):
    cfg = load_checkpoint(upstream.pth, num_heads=upstream.num_heads).config
    info = upstream.info
    assert (cfg.arch, cfg.embed_dim, cfg.depth, cfg.num_classes) == (
        info["arch"],
        info["embed_dim"],
        info["depth"],
        info["num_classes"],
    )
    assert (cfg.coarse_grid, cfg.k, cfg.qkv_bias) == (info["coarse_grid"], info["k"], info["qkv_bias"])
    assert cfg.mlp_ratio == info["mlp_ratio"] and cfg.layer_norm_eps == info["layer_norm_eps"]


def test_coarse_input_is_bilinear_align_corners(upstream):
    from cfvit_deploy.layers import resize_bilinear

    cfg = load_checkpoint(upstream.pth, num_heads=upstream.num_heads).config
    coarse = resize_bilinear(torch.from_numpy(upstream.images), cfg.coarse_image_size)
    np.testing.assert_allclose(coarse.numpy(), upstream.ref["coarse_images"], atol=1e-6)


def test_batch_of_one_equals_full_batch(upstream):
    model = load_checkpoint(upstream.pth, num_heads=upstream.num_heads)
    x = torch.from_numpy(upstream.images)
    with torch.no_grad():
        full = model(x)
        for i in range(len(x)):
            one = model(x[i : i + 1])
            assert one.fine_logits.shape == (1, model.config.num_classes)
            np.testing.assert_allclose(one.fine_logits[0], full.fine_logits[i], atol=1e-4)
            assert torch.equal(one.informative_idx[0], full.informative_idx[i])


@pytest.mark.parametrize(
    "arch,grid,params",
    [("deit", 7, 23_252_200), ("deit", 9, 23_313_640), ("lvvit", 7, 27_058_064), ("lvvit", 9, 27_119_504)],
)
def test_official_sizes_parameter_count(arch, grid, params):
    model = CFViT(ModelConfig.named(arch, "small", coarse_grid=grid))
    assert sum(p.numel() for p in model.parameters()) == params
    expected_keys = 159 if arch == "deit" else 211
    assert len(model.state_dict()) == expected_keys


@pytest.mark.parametrize("arch", ["deit", "lvvit"])
@pytest.mark.parametrize("grid", [7, 9])
def test_stage_shapes_and_sequence_length(arch, grid):
    cfg = ModelConfig.named(arch, "micro", coarse_grid=grid, num_classes=5)
    model = CFViT(cfg).eval()
    x = torch.randn(2, 3, cfg.fine_image_size, cfg.fine_image_size)
    seen = {}
    hook = model.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("n", []).append(i[0].shape[1]))
    with torch.no_grad():
        out = model(x)
    hook.remove()
    assert seen["n"] == [cfg.num_coarse + 1, cfg.fine_seq_len]
    assert cfg.fine_seq_len == {7: 125, 9: 205}[grid]
    assert cfg.k == math.ceil(0.5 * grid * grid)
    assert out.coarse_logits.shape == out.fine_logits.shape == (2, 5)
    assert out.score.shape == (2, grid * grid)
    # the score orders the selection: informative scores >= uninformative ones, both descending
    s = out.score.gather(1, torch.cat([out.informative_idx, out.uninformative_idx], 1))
    assert torch.all(s[:, :-1] >= s[:, 1:])


def test_fine_indices_are_the_2x2_children():
    grid = 7
    inf = torch.tensor([[0, 8, 48]])
    idx = fine_indices(inf, grid)
    # coarse (r, c) -> fine (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) on the 14-wide grid
    expect = []
    for dr, dc in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        expect += [(2 * (c // grid) + dr) * 2 * grid + 2 * (c % grid) + dc for c in inf[0].tolist()]
    assert idx[0].tolist() == expect


def test_predict_gate_semantics(upstream):
    model = load_checkpoint(upstream.pth, num_heads=upstream.num_heads)
    x = torch.from_numpy(upstream.images)
    conf = upstream.ref["coarse_confidence"]
    # an eta halfway between two recorded confidences: a mixed batch, and no image within float
    # rounding of eta (CPUs differ in the last bits; the tie itself is pinned by test_gate_ties.py)
    ordered = np.sort(conf.astype(np.float64))
    mid = float((ordered[len(conf) // 2 - 1] + ordered[len(conf) // 2]) / 2)
    assert 0 < (conf >= mid).sum() < len(conf) and np.abs(conf - mid).min() > 1e-4
    for eta in (0.0, mid, 1.0):
        pred = model.predict(x, eta)
        exited = pred.exited.numpy()
        np.testing.assert_array_equal(exited, conf >= eta)
        expect = np.where(exited[:, None], upstream.ref["coarse_logits"], upstream.ref["fine_logits"])
        np.testing.assert_allclose(pred.logits.numpy(), expect, atol=1e-4)
    with pytest.raises(ValueError, match="eta"):
        model.predict(x, 1.5)


def test_eval_is_deterministic_and_device_agnostic():
    """Eval disables stochastic depth: a model built with drop_path_rate 0.5 gives, in eval mode, exactly
    the outputs of the same weights built without it (in train mode two calls differ, so the rate is live).
    Device-agnostic: the forward runs on the "meta" device, so any tensor created on a fixed device fails."""
    cfg = ModelConfig.named("lvvit", "micro", num_classes=4)
    torch.manual_seed(0)
    dropping = CFViT(cfg, drop_path_rate=0.5)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        dropping.train()
        assert not torch.equal(dropping(x).fine_logits, dropping(x).fine_logits)
        plain = CFViT(cfg, drop_path_rate=0.0)
        plain.load_state_dict(dropping.state_dict())  # after the train calls (they update BatchNorm stats)
        dropping.eval()
        got, want = dropping(x), plain.eval()(x)
    for field in ("coarse_logits", "fine_logits", "score"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert torch.equal(got.informative_idx, want.informative_idx)

    meta = CFViT(cfg).eval().to("meta")
    with torch.no_grad():
        out = meta(torch.empty(2, 3, 224, 224, device="meta"))
    assert out.fine_logits.device.type == "meta" and out.fine_logits.shape == (2, 4)
    assert out.informative_idx.device.type == "meta"
