"""load_checkpoint: every accepted layout, and a clear CheckpointError for every bad file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from cfvit_deploy import CheckpointError, ModelConfig, load_checkpoint
from cfvit_deploy.checkpoints import checkpoint_metadata, save_checkpoint
from cfvit_deploy.model import CFViT


@pytest.fixture(scope="module")
def micro_state():
    torch.manual_seed(0)
    model = CFViT(ModelConfig.named("deit", "micro", num_classes=7)).eval()
    return model, model.state_dict()


@pytest.mark.parametrize("layout", ["model", "state_dict", "state_dict_ema", "module_prefix", "bare"])
def test_accepted_layouts(tmp_path, micro_state, layout):
    model, state = micro_state
    if layout == "module_prefix":
        obj = {"model": {f"module.{k}": v for k, v in state.items()}}
    elif layout == "bare":
        obj = dict(state)
    else:
        obj = {layout: state, "epoch": 3}
    torch.save(obj, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth", num_heads=3)
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_default_heads_is_six_and_own_checkpoint_records_heads(tmp_path, micro_state):
    model, state = micro_state
    torch.save({"model": state}, tmp_path / "official.pth")
    assert load_checkpoint(tmp_path / "official.pth").config.num_heads == 6
    save_checkpoint(model, tmp_path / "own.pth", class_names=[str(i) for i in range(7)])
    loaded = load_checkpoint(tmp_path / "own.pth")
    assert loaded.config == model.config
    assert checkpoint_metadata(tmp_path / "own.pth")["class_names"][3] == "3"
    # the own format is the official layout: {"model": state_dict} with the original names
    raw = torch.load(tmp_path / "own.pth", weights_only=True)
    assert set(raw["model"]) == set(state)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_not_a_torch_file(tmp_path):
    (tmp_path / "x.pth").write_text("hello, I am text")
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(tmp_path / "x.pth")


def test_truncated_file(tmp_path, micro_state):
    torch.save({"model": micro_state[1]}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(CheckpointError, match="would run code"):
            load_checkpoint(tmp_path / name)


def test_plain_deit_is_named(tmp_path):
    torch.save({"model": {"pos_embed": torch.zeros(1, 197, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}},
               tmp_path / "deit.pth")
    with pytest.raises(CheckpointError, match="plain ViT/DeiT.*pos_embed_list"):
        load_checkpoint(tmp_path / "deit.pth")


def test_missing_and_extra_keys(tmp_path, micro_state):
    state = dict(micro_state[1])
    state.pop("reuse_block.1.fc2.bias")
    state["blocks.0.attn.extra"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pth", num_heads=3)
    msg = str(err.value)
    assert "1 missing keys (reuse_block.1.fc2.bias)" in msg and "1 unexpected keys (blocks.0.attn.extra)" in msg


def test_shape_mismatch_names_the_tensor(tmp_path, micro_state):
    torch.save({"model": micro_state[1]}, tmp_path / "g7.pth")
    forced = ModelConfig.named("deit", "micro", num_classes=7, coarse_grid=9)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(pos_embed_list.0: checkpoint \(1, 50, 48\)"):
        load_checkpoint(tmp_path / "g7.pth", config=forced)


def test_wrong_architecture_keys(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a CF-ViT"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_lvvit_keys_recognised(tmp_path):
    model = CFViT(ModelConfig.named("lvvit", "micro", num_classes=3, coarse_grid=9))
    torch.save({"state_dict_ema": model.state_dict()}, tmp_path / "lv.pth")
    cfg = load_checkpoint(tmp_path / "lv.pth", num_heads=3).config
    assert (cfg.arch, cfg.coarse_grid, cfg.qkv_bias, cfg.mlp_ratio, cfg.depth) == ("lvvit", 9, False, 3, 16)


def test_training_checkpoint_with_args_namespace_loads(tmp_path, micro_state):
    """The original training scripts save `args` (an argparse.Namespace) beside the weights."""
    import argparse

    torch.save({"model": micro_state[1], "epoch": 299, "args": argparse.Namespace(lr=1e-3, model="cf_deit_small")},
               tmp_path / "checkpoint.pth")
    loaded = load_checkpoint(tmp_path / "checkpoint.pth", num_heads=3)
    assert torch.equal(loaded.state_dict()["head.weight"], micro_state[1]["head.weight"])
