"""The distillation loss and quantized distillation (Algorithm 1) as a training building block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compressor
from compressor.format.packed import load_packed
from compressor.training.distillation import distillation_loss
from compressor.training.finish import finish_
from compressor.training.quantized_distillation import quantized_distillation
from compressor.training.step import DistillConfig, distill_step


def _reference(student, teacher, target, t, alpha, ignore_index=-100, reduction="mean"):
    """The loss written out in float64 from its definition."""
    s, te = student.double(), teacher.double()
    keep = target != ignore_index
    s, te, y = s[keep], te[keep], target[keep]
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).squeeze(1)
    p_t = torch.softmax(te / t, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / t, -1))).sum(-1)
    per_position = (1 - alpha) * ce + alpha * t * t * kl
    return per_position.sum() if reduction == "sum" else per_position.mean()


def _logits(n=12, c=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, generator=gen) * 2
    teacher = torch.randn(n, c, generator=gen) * 2
    target = torch.randint(0, c, (n,), generator=gen)
    target[[1, n - 1]] = -100
    return student, teacher, target


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("t", "alpha"), [(1.0, 0.7), (5.0, 0.3), (2.0, 0.0), (0.5, 1.0)])
def test_loss_matches_definition(t, alpha, reduction):
    student, teacher, target = _logits()
    got = distillation_loss(student, teacher, target, t, alpha, reduction=reduction)
    want = _reference(student, teacher, target, t, alpha, reduction=reduction)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize(("t", "alpha"), [(1.0, 0.7), (2.0, 1.0)])
def test_top_k_teacher_renormalised_or_with_the_rest_merged(t, alpha):
    student, teacher, target = _logits(c=9, seed=3)
    full = distillation_loss(student, teacher, target, t, alpha, reduction="sum")
    every = compressor.TopKLogits.of(teacher, 9)
    assert distillation_loss(student, every, target, t, alpha, reduction="sum").item() == (
        pytest.approx(full.item(), rel=1e-5)
    )
    top = compressor.TopKLogits.of(teacher, 3)
    got = distillation_loss(student, top, target, t, alpha, reduction="sum")
    # By hand: masking the other classes' logits to -inf renormalises over the top 3.
    masked = torch.full_like(teacher, float("-inf")).scatter(1, top.indices, top.values)
    keep = target != -100
    s, y = student[keep].double(), target[keep]
    p_t = torch.softmax(masked[keep].double() / t, -1)
    log_q = torch.log_softmax(s / t, -1)
    kl = torch.where(p_t > 0, p_t * (torch.log(p_t) - log_q), torch.zeros_like(p_t)).sum()
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).sum()
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * t * t * kl).item(), rel=1e-5)
    assert got.item() != pytest.approx(full.item(), rel=1e-3)
    # With the normalizer, the other six classes are one merged class on both sides.
    merged = compressor.TopKLogits.of(teacher, 3, temperature=t)
    got = distillation_loss(student, merged, target, t, alpha, reduction="sum")
    p_full, q_full = torch.softmax(teacher[keep].double() / t, -1), log_q.exp()
    rest = torch.ones_like(p_full, dtype=torch.bool).scatter(1, top.indices[keep], False)
    p_top, q_top = p_full.gather(1, top.indices[keep]), q_full.gather(1, top.indices[keep])
    p_rest, q_rest = (p_full * rest).sum(1), (q_full * rest).sum(1)
    kl = (p_top * (p_top / q_top).log()).sum() + (p_rest * (p_rest / q_rest).log()).sum()
    assert got.item() == pytest.approx(((1 - alpha) * ce + alpha * t * t * kl).item(), rel=1e-5)
    merged_every = compressor.TopKLogits.of(teacher, 9, temperature=t)
    exact = distillation_loss(
        student.requires_grad_(), merged_every, target, t, alpha, reduction="sum"
    )
    exact.backward()
    assert exact.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="normalizer is for temperature"):
        distillation_loss(student, merged, target, t + 1, alpha)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_matches_closed_form(reduction):
    """d loss / d z = (1-a)(softmax(z) - onehot) + a T (softmax(z/T) - softmax(t/T)) per counted
    position, zero at ignored positions; the teacher gets none."""
    t, alpha = 3.0, 0.6
    student, teacher, target = _logits(seed=1)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, target, t, alpha, reduction=reduction).backward()
    keep = target != -100
    onehot = nn.functional.one_hot(target.clamp_min(0), student.shape[1]).double()
    s, te = student.detach().double(), teacher.detach().double()
    grad = (1 - alpha) * (torch.softmax(s, -1) - onehot) + alpha * t * (
        torch.softmax(s / t, -1) - torch.softmax(te / t, -1)
    )
    grad[~keep] = 0
    if reduction == "mean":
        grad /= keep.sum()
    torch.testing.assert_close(student.grad.double(), grad, rtol=1e-5, atol=1e-7)
    assert teacher.grad is None


def test_gradient_matches_finite_differences():
    student, teacher, target = _logits(n=5, c=4, seed=2)
    student = student.requires_grad_(True)
    loss = distillation_loss(student, teacher, target, 2.0, 0.5)
    (grad,) = torch.autograd.grad(loss, student)
    eps = 1e-3
    for i in range(student.shape[0]):
        for j in range(student.shape[1]):
            up, down = student.detach().clone(), student.detach().clone()
            up[i, j] += eps
            down[i, j] -= eps
            diff = (
                _reference(up, teacher, target, 2.0, 0.5)
                - _reference(down, teacher, target, 2.0, 0.5)
            ) / (2 * eps)
            assert grad[i, j].item() == pytest.approx(diff.item(), abs=2e-5)


def test_sequence_logits_and_half_precision():
    """(batch, time, vocab) logits flatten; fp16 inputs are computed on in fp32."""
    student, teacher, target = _logits(n=12, c=7, seed=3)
    flat = distillation_loss(student, teacher, target, 1.0, 0.7)
    seq = distillation_loss(
        student.view(3, 4, 7).half(), teacher.view(3, 4, 7).half(), target.view(3, 4), 1.0, 0.7
    )
    assert seq.dtype == torch.float32
    assert seq.item() == pytest.approx(flat.item(), rel=2e-3)


def test_soft_target_mode_is_t2_kl_over_all_positions():
    student, teacher, _ = _logits(seed=4)
    t = 4.0
    got = distillation_loss(student, teacher, None, t, alpha=0.3)
    everything = torch.zeros(student.shape[0], dtype=torch.long)
    want = _reference(student, teacher, everything, t, alpha=1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    same = distillation_loss(teacher, teacher, None, t, 0.5)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_all_positions_ignored_gives_zero():
    student, teacher, target = _logits()
    loss = distillation_loss(student, teacher, torch.full_like(target, -100), 1.0, 0.7)
    assert loss.item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"reduction": "none"}, "reduction must be one of"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    student, teacher, target = _logits()
    args = {"temperature": 1.0, "alpha": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        distillation_loss(student, teacher, target, **args)
    if "reduction" not in kwargs:
        with pytest.raises(ValueError, match=message):
            DistillConfig(kwargs.get("temperature", 1.0), kwargs.get("alpha", 0.5))


def test_mismatched_shapes_raise():
    student, teacher, target = _logits()
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(student, teacher[:, :5], target, 1.0, 0.5)
    with pytest.raises(ValueError, match="positions"):
        distillation_loss(student, teacher, target[:5], 1.0, 0.5)


# ----------------------------------------------------------------------------------------------
# Algorithm 1 on a small model (random data: these are invariants, the CIFAR run is elsewhere).


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def _data(steps=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 5, generator=gen)
    out = []
    for _ in range(steps):
        x = torch.randn(32, 20, generator=gen)
        out.append((x, (x @ w).argmax(1)))
    return out


def test_quantized_distillation_invariants(tmp_path):
    teacher = _mlp(0)
    quantized_distillation(teacher, None, _data(), torch.optim.Adam(teacher.parameters(), 1e-2), 30)
    frozen = copy.deepcopy(teacher.state_dict())
    student = compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=3, bucket_size=64))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in compressor.shadow_state_dict(student).items()}
    history = quantized_distillation(
        student, teacher, _data(), optimizer, 30, DistillConfig(temperature=2.0, alpha=0.7)
    )
    assert len(history) == 30
    # The teacher is frozen: eval mode, no gradients, unchanged.
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, frozen[key])
    # The optimizer updated the full-precision shadow weights, which stay off the grid.
    for name, spec in compressor.quantization_specs(student).items():
        shadow = compressor.shadow_state_dict(student)[name]
        assert shadow.dtype == torch.float32
        assert not torch.equal(shadow, before[name])
        assert not torch.equal(shadow, spec.quantize(shadow))
        assert torch.equal(
            student.get_submodule(name[: -len(".weight")]).weight, spec.quantize(shadow)
        )
    # The final quantization: a packed file and materialized weights, both on the grid.
    expected = compressor.quantized_state_dict(student)
    finish_(student, tmp_path / "student.qd")
    for name, spec in compressor.quantization_specs(student).items():
        weight = student.state_dict()[name]
        assert torch.equal(weight, expected[name])
        assert torch.equal(spec.quantize(weight), weight)
    loaded, _ = load_packed(tmp_path / "student.qd")
    for name, value in student.state_dict().items():
        assert torch.equal(loaded[name], value)


def test_distill_step_reports_the_distillation_term_and_custom_forward():
    teacher, student = _mlp(0), compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=4))
    x, y = _data(1)[0]
    calls = []

    def forward(model, inputs):
        calls.append(model)
        return model(inputs["x"])

    record = distill_step(
        student,
        teacher,
        {"x": x},
        y,
        torch.optim.SGD(student.parameters(), 0.0),
        DistillConfig(2.0, 0.5),
        forward,
    )
    with torch.no_grad():
        want = distillation_loss(student(x), teacher(x), y, 2.0, 1.0)
    assert record["distillation"] == pytest.approx(want.item(), rel=1e-5)
    assert calls == [student, teacher]
    with pytest.raises(ValueError, match="needs labels"):
        distill_step(
            student, None, x, None, torch.optim.SGD(student.parameters(), 0.1), DistillConfig()
        )
    with pytest.raises(ValueError, match="steps"):
        quantized_distillation(
            student, teacher, _data(1), torch.optim.SGD(student.parameters(), 0.1), -1
        )


def test_custom_loss_fn_is_back_propagated():
    """A plugin's own loss (here a summed one) replaces the default; the step uses its gradient."""
    teacher = _mlp(0)
    student = compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=4))
    twin = copy.deepcopy(student.state_dict())
    seen = []

    def summed(student_logits, teacher_logits, target):
        seen.append(teacher_logits is not None and not teacher_logits.requires_grad)
        return distillation_loss(student_logits, teacher_logits, target, 1.0, 0.5, reduction="sum")

    x, y = _data(1)[0]
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    record = distill_step(student, teacher, x, y, opt, DistillConfig(), loss_fn=summed)
    assert seen == [True]
    reference = compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=4))
    reference.load_state_dict(twin)
    loss = distillation_loss(reference(x), teacher(x), y, 1.0, 0.5, reduction="sum")
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    with torch.no_grad():
        for (name, p), q in zip(reference.named_parameters(), student.parameters()):
            torch.testing.assert_close(q, p - 0.01 * p.grad, msg=name)
