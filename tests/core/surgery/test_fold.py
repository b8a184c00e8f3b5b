"""`compressor.fold_batchnorm_`: BatchNorm merged into the convolution before it computes what
the original computes in eval mode, and the folded model packs and reloads into a fresh model
folded alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compressor

pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")


def _randomize_batchnorms(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial 0/1, as trained."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.3, 3.0)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


class Block(nn.Module):
    """A conv -> BN pair outside any Sequential, a residual, and a BN before a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, with a bias
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.pre = nn.BatchNorm2d(8)  # before a convolution: stays
        self.conv3 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y))) + y
        return self.conv3(torch.relu(self.pre(y)))


class Untraceable(nn.Module):
    """A forward that torch.fx cannot trace (control flow on values): its children fold."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Conv1d(6, 2, 1)
        self.head_bn = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 0:
            y = y * 2
        return self.head_bn(self.head(y))


class Shared(nn.Module):
    """Cases that must not fold: a conv output read twice, a conv called twice, a BN without
    running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.twice = nn.Conv2d(3, 3, 1)
        self.twice_bn = nn.BatchNorm2d(3)
        self.stats = nn.Conv2d(3, 3, 1)
        self.no_stats = nn.BatchNorm2d(3, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = self.bn(y) + y
        y = self.twice_bn(self.twice(self.twice(y)))
        return self.no_stats(self.stats(y))


def test_pairs_follow_the_data_flow():
    assert compressor.batchnorm_pairs(Block()) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert compressor.batchnorm_pairs(Shared()) == []
    assert compressor.batchnorm_pairs(Untraceable()) == [("body.0", "body.1")]


@pytest.mark.parametrize("make", [Block, Untraceable])
def test_folded_hand_made_models_match_in_eval_mode(make):
    torch.manual_seed(0)
    model = _randomize_batchnorms(make()).eval()
    x = torch.randn(2, 4, 9, 9) if make is Block else torch.randn(2, 3, 11)
    with torch.no_grad():
        expected = model(x)
    before = _batchnorms(model)
    assert compressor.fold_batchnorm_(model) is model
    assert _batchnorms(model) == before - 2 + (make is Untraceable)
    with torch.no_grad():
        assert _close(model(x), expected)


def test_cases_that_must_not_fold_are_left_alone():
    model = _randomize_batchnorms(Shared()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressor.fold_batchnorm_(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_quantized_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    compressor.quantize_(model, compressor.QuantConfig(bits=4))
    with pytest.raises(ValueError, match="before quantize_"):
        compressor.fold_batchnorm_(model)


# builder: BatchNorms left after folding (those that follow no convolution directly).
TORCHVISION = {
    "resnet18": 0,
    "mobilenet_v3_small": 0,
    "shufflenet_v2_x0_5": 0,
    "efficientnet_b0": 0,
    "mnasnet0_5": 0,
    "regnet_y_400mf": 0,
    "densenet121": 62,  # pre-activation: norm -> relu -> conv
    "googlenet": 2,  # in the auxiliary heads, which eval mode does not run
}


@pytest.mark.parametrize("builder", sorted(TORCHVISION))
def test_folded_torchvision_model_matches_and_round_trips_through_a_packed_file(builder, tmp_path):
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = _randomize_batchnorms(models.get_model(builder, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    compressor.fold_batchnorm_(model)
    assert _batchnorms(model) == TORCHVISION[builder]
    with torch.no_grad():
        assert _close(model(x), expected)

    compressor.quantize_(model, compressor.QuantConfig(bits=4))
    with torch.no_grad():
        quantized = model(x)
    compressor.save_packed(model, tmp_path / "folded.qd")
    state, _ = compressor.load_packed(tmp_path / "folded.qd")
    torch.manual_seed(1)
    fresh = compressor.fold_batchnorm_(models.get_model(builder, num_classes=10).eval())
    fresh.load_state_dict(state)  # strict: the same convolutions with biases, no BatchNorm
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized)
