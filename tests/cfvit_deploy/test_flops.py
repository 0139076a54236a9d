"""Per-stage GMACs reproduce the paper's numbers within 3%."""

import pytest

from cfvit_deploy import ModelConfig
from cfvit_deploy.flops import baseline_gmacs, stage_gmacs


@pytest.mark.parametrize(
    "arch,grid,paper",
    [("deit", 7, (1.1, 4.0)), ("deit", 9, (1.83, 6.70)), ("lvvit", 7, (1.57, 6.18)), ("lvvit", 9, (2.62, 10.3))],
)
def test_paper_flops(arch, grid, paper):
    got = stage_gmacs(ModelConfig.named(arch, "small", coarse_grid=grid))
    assert got.coarse == pytest.approx(paper[0], rel=0.03)
    assert got.fine == pytest.approx(paper[1], rel=0.03)


def test_plain_deit_small_and_expected():
    cfg = ModelConfig.named("deit", "small")
    assert baseline_gmacs(cfg) == pytest.approx(4.6, rel=0.03)
    g = stage_gmacs(cfg)
    assert g.expected(0.0) == g.coarse and g.expected(1.0) == pytest.approx(g.fine)
    assert g.coarse < g.expected(0.24) < g.fine
