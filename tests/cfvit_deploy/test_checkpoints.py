"""load_checkpoint: every accepted layout, and a clear CheckpointError for every bad file."""

from __future__ import annotations

import argparse
import os
import pickle
import re

import numpy as np
import pytest
import torch

from cfvit_deploy import CheckpointError, ModelConfig, UsageError, load_checkpoint
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
    torch.save(
        {"model": {"pos_embed": torch.zeros(1, 197, 8), "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16)}},
        tmp_path / "deit.pth",
    )
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

    torch.save(
        {"model": micro_state[1], "epoch": 299, "args": argparse.Namespace(lr=1e-3, model="cf_deit_small")},
        tmp_path / "checkpoint.pth",
    )
    loaded = load_checkpoint(tmp_path / "checkpoint.pth", num_heads=3)
    assert torch.equal(loaded.state_dict()["head.weight"], micro_state[1]["head.weight"])


# -- what an unloadable file looks like (issue 13 item 9) ----------------------------------------------
@pytest.mark.parametrize(
    "content, looks",
    [
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 101\n",
            r"a text file \(\d+ bytes, starting 'version https",
        ),
        (b"PK\x03\x04" + bytes(range(200)), "a zip archive of 204 bytes"),
        (bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)), "binary data of 300 bytes"),
        (b"", r"an empty file \(0 bytes\)"),
    ],
    ids=["text", "zip", "random", "empty"],
)
def test_unloadable_file_says_what_it_looks_like(tmp_path, content, looks):
    (tmp_path / "x.pth").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "x.pth")
    msg = str(err.value)
    assert re.search(looks, msg), msg
    assert not re.search(r": \d+$", msg) and "Unsupported operand" not in msg  # no stray number from pickle


def test_plain_deit_says_what_to_do(tmp_path):
    torch.save(
        {
            "model": {
                "pos_embed": torch.zeros(1, 197, 48),
                "cls_token": torch.zeros(1, 1, 48),
                "patch_embed.proj.weight": torch.zeros(48, 3, 16, 16),
            }
        },
        tmp_path / "deit.pth",
    )
    with pytest.raises(CheckpointError, match=r"plain ViT/DeiT .*not a CF-ViT.*train one with `cfvit train`"):
        load_checkpoint(tmp_path / "deit.pth", num_heads=5)  # the heads are not what is wrong here


# -- the number of heads, checked against everything the file says (issue 13 item 6) -----------------
@pytest.fixture(scope="module")
def small_width_state():
    """A 384-wide CF-ViT (the official DeiT-S width; four blocks keep it light)."""
    torch.manual_seed(0)
    return CFViT(ModelConfig(embed_dim=384, depth=4, num_heads=6, num_classes=10)).state_dict()


@pytest.mark.parametrize("bad", [0, -6, True, 2.0, "6"])
def test_non_positive_or_non_integer_heads_are_refused(tmp_path, micro_state, bad):
    torch.save({"model": micro_state[1]}, tmp_path / "c.pth")
    with pytest.raises(UsageError, match="num_heads must be a positive integer"):
        load_checkpoint(tmp_path / "c.pth", num_heads=bad)


def test_heads_that_do_not_divide_the_width_are_a_usage_error(tmp_path, micro_state):
    torch.save({"model": micro_state[1]}, tmp_path / "c.pth")
    with pytest.raises(UsageError, match=r"num_heads 5 does not divide .*embed_dim 48"):
        load_checkpoint(tmp_path / "c.pth", num_heads=5)


@pytest.mark.parametrize("name", ["cf_deit_small", "cf_lvvit_small", "deit_small_patch16_224"])
def test_training_args_model_name_sets_and_checks_the_heads(tmp_path, small_width_state, name):
    torch.save({"model": small_width_state, "args": argparse.Namespace(model=name)}, tmp_path / "ckpt.pth")
    assert load_checkpoint(tmp_path / "ckpt.pth").config.num_heads == 6
    assert load_checkpoint(tmp_path / "ckpt.pth", num_heads=6).config.num_heads == 6
    with pytest.raises(UsageError, match=rf"num_heads 8 contradicts .*args.model '{name}' says 6 heads"):
        load_checkpoint(tmp_path / "ckpt.pth", num_heads=8)  # 8 divides 384: only the args can tell


def test_timm_saver_arch_names_the_heads(tmp_path, small_width_state):
    torch.save({"state_dict": small_width_state, "arch": "cf_deit_small"}, tmp_path / "last.pth.tar")
    with pytest.raises(UsageError, match="num_heads 12 contradicts .*arch 'cf_deit_small' says 6"):
        load_checkpoint(tmp_path / "last.pth.tar", num_heads=12)


def test_recorded_heads_are_not_silently_overridden(tmp_path, micro_state):
    model, _ = micro_state  # micro: 3 heads, recorded by save_checkpoint
    save_checkpoint(model, tmp_path / "own.pth")
    with pytest.raises(UsageError, match=r"num_heads 6 contradicts .*recorded .* says 3 heads"):
        load_checkpoint(tmp_path / "own.pth", num_heads=6)
    assert load_checkpoint(tmp_path / "own.pth", num_heads=3).config.num_heads == 3


def test_a_forced_config_is_checked_against_the_file(tmp_path, small_width_state):
    """validate rebuilds the reference with the export's config: a wrong head count there is caught."""
    torch.save({"model": small_width_state, "args": argparse.Namespace(model="cf_deit_small")}, tmp_path / "c.pth")
    wrong = ModelConfig(embed_dim=384, depth=4, num_heads=8, num_classes=10)
    with pytest.raises(CheckpointError, match="config says 8 heads but its training args.model 'cf_deit_small' says 6"):
        load_checkpoint(tmp_path / "c.pth", config=wrong)


# -- trained vs EMA weights (issue 13 item 20) ------------------------------------------------------------
@pytest.fixture(scope="module")
def ema_state(micro_state):
    return {k: v + 1.0 if v.is_floating_point() else v for k, v in micro_state[1].items()}


def _head(model):
    return model.state_dict()["head.weight"]


def test_timm_saver_file_loads_the_ema_by_default_and_the_model_on_request(tmp_path, micro_state, ema_state):
    state = micro_state[1]
    torch.save({"state_dict": state, "state_dict_ema": ema_state, "epoch": 9}, tmp_path / "t.pth.tar")
    auto = load_checkpoint(tmp_path / "t.pth.tar", num_heads=3)
    assert torch.equal(_head(auto), ema_state["head.weight"]) and auto.metadata["weights_key"] == "state_dict_ema"
    ema = load_checkpoint(tmp_path / "t.pth.tar", num_heads=3, weights="ema")
    assert torch.equal(_head(ema), ema_state["head.weight"])
    trained = load_checkpoint(tmp_path / "t.pth.tar", num_heads=3, weights="model")
    assert torch.equal(_head(trained), state["head.weight"]) and trained.metadata["weights_key"] == "state_dict"


def test_deit_file_loads_the_trained_weights_by_default(tmp_path, micro_state, ema_state):
    state = micro_state[1]
    torch.save({"model": state, "model_ema": ema_state}, tmp_path / "checkpoint.pth")
    assert torch.equal(_head(load_checkpoint(tmp_path / "checkpoint.pth", num_heads=3)), state["head.weight"])
    ema = load_checkpoint(tmp_path / "checkpoint.pth", num_heads=3, weights="ema")
    assert torch.equal(_head(ema), ema_state["head.weight"]) and ema.metadata["weights_key"] == "model_ema"


def test_asking_for_weights_the_file_does_not_hold(tmp_path, micro_state):
    torch.save({"model": micro_state[1]}, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_checkpoint(tmp_path / "m.pth", num_heads=3, weights="ema")
    with pytest.raises(UsageError, match="weights must be one of auto, model, ema"):
        load_checkpoint(tmp_path / "m.pth", num_heads=3, weights="best")
