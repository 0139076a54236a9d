"""CFViT.predict (the PyTorch twin of CFViTPipeline.run) refuses a bad η as a UsageError (issue 13 item 7)."""

from __future__ import annotations

import math

import pytest
import torch

from cfvit_deploy import ModelConfig, UsageError
from cfvit_deploy.model import CFViT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CFViT(ModelConfig.named("deit", "micro", num_classes=4)).eval()


@pytest.mark.parametrize(
    "eta, message",
    [
        (1.5, "eta must lie in [0, 1], got 1.5"),
        (-0.1, "eta must lie in [0, 1], got -0.1"),
        (math.nan, "eta must lie in [0, 1], got nan"),
        (None, "eta must be a number in [0, 1], got None"),
        ("0.5", "eta must be a number in [0, 1], got '0.5'"),
        (True, "eta must be a number in [0, 1], got True"),
    ],
)
def test_bad_eta_is_a_usage_error_worded_like_the_pipeline(model, eta, message):
    with pytest.raises(UsageError) as err:
        model.predict(torch.zeros(1, 3, 224, 224), eta)
    assert str(err.value) == message and err.value.exit_code == 2


def test_eta_one_and_zero_are_accepted(model):
    x = torch.zeros(2, 3, 224, 224)
    assert model.predict(x, 0.0).exited.all() and model.predict(x, 1).exited.sum() <= 2
