"""QKD's three phases: who trains, who is frozen, and on which loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import compressor
from compressor.training.distillation import distillation_loss
from compressor.training.qkd import PHASES, QKDSchedule, qkd_train


def _mlp(seed, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, width), nn.ReLU(), nn.Linear(width, 4))


def _batches(n=8):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 4, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(32, 12, generator=gen)
        out.append((x, (x @ w).argmax(1)))
    return out


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _changed(before, model):
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_phases_freeze_and_train_the_right_model():
    teacher = _mlp(0, 48)
    student = compressor.quantize_(
        _mlp(1), compressor.QuantConfig(bits=4, method="lsq", act_bits=4)
    )
    data = _batches()
    student(data[0][0])
    schedule = QKDSchedule(3, 4, 2, temperature=2.0, alpha=0.5)
    student_opt = torch.optim.SGD(student.parameters(), lr=0.05)
    teacher_opt = torch.optim.SGD(teacher.parameters(), lr=0.05)
    teacher_log, student_log = [], []
    teacher_before, student_before = [_snapshot(teacher)], [_snapshot(student)]

    def on_step(step, record):
        teacher_log.append(
            (
                record["phase"],
                _changed(teacher_before[-1], teacher),
                teacher.training,
                all(p.requires_grad for p in teacher.parameters()),
            )
        )
        student_log.append(_changed(student_before[-1], student))
        teacher_before.append(_snapshot(teacher))
        student_before.append(_snapshot(student))

    history = qkd_train(student, teacher, data, schedule, student_opt, teacher_opt, on_step=on_step)
    assert [r["phase"] for r in history] == [PHASES[0]] * 3 + [PHASES[1]] * 4 + [PHASES[2]] * 2
    for phase, teacher_changed, training, trainable in teacher_log:
        if phase == "co-studying":
            assert teacher_changed and training and trainable
        else:
            assert not teacher_changed and not training and not trainable
    assert all(student_log)  # the student learns in every phase
    assert all(("teacher_loss" in r) == (r["phase"] == "co-studying") for r in history)
    # After the schedule the teacher is left frozen.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_each_phase_uses_its_loss():
    """Self-studying: labels only; co-studying: each model distils from the other (teacher loss
    is CE + KD from the student); tutoring: KD from the frozen teacher."""
    data = _batches(3)
    schedule = QKDSchedule(1, 1, 1, temperature=3.0, alpha=0.4)
    teacher, student = _mlp(0, 48), compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=4))
    expected = []
    t_copy, s_copy = copy.deepcopy(teacher), _mlp(1)
    compressor.quantize_(s_copy, compressor.QuantConfig(bits=4))

    def on_step(step, record):
        expected.append(record)

    # Zero learning rates: the losses at every step are those of the initial models.
    qkd_train(
        student,
        teacher,
        data,
        schedule,
        torch.optim.SGD(student.parameters(), lr=0.0),
        torch.optim.SGD(teacher.parameters(), lr=0.0),
        on_step=on_step,
    )
    with torch.no_grad():
        s = [s_copy(x) for x, _ in data]
        t_copy.train()
        t_train = [t_copy(x) for x, _ in data]
        t_copy.eval()
        t_eval = [t_copy(x) for x, _ in data]
    ys = [y for _, y in data]
    ce = nn.functional.cross_entropy(s[0], ys[0]).item()
    assert expected[0]["student_loss"] == pytest.approx(ce, rel=1e-5)
    co_student = distillation_loss(s[1], t_train[1], ys[1], 3.0, 0.4).item()
    co_teacher = distillation_loss(t_train[1], s[1], ys[1], 3.0, 0.4).item()
    assert expected[1]["student_loss"] == pytest.approx(co_student, rel=1e-5)
    assert expected[1]["teacher_loss"] == pytest.approx(co_teacher, rel=1e-5)
    tutor = distillation_loss(s[2], t_eval[2], ys[2], 3.0, 0.4).item()
    assert expected[2]["student_loss"] == pytest.approx(tutor, rel=1e-5)


def test_tutoring_learns_from_the_co_studied_teacher():
    """The teacher that tutors is the one co-studying changed, not the one passed in; the
    student's learning-rate schedule steps once per step across all phases."""
    data = _batches(4)
    teacher, student = _mlp(0, 48), compressor.quantize_(_mlp(1), compressor.QuantConfig(bits=4))
    original = copy.deepcopy(teacher)
    student_opt = torch.optim.SGD(student.parameters(), lr=0.0)  # a fixed student
    scheduler = torch.optim.lr_scheduler.LambdaLR(student_opt, lambda step: 1.0)
    records = []
    qkd_train(
        student,
        teacher,
        data,
        QKDSchedule(1, 2, 1, temperature=2.0, alpha=0.5),
        student_opt,
        torch.optim.SGD(teacher.parameters(), lr=0.5),
        on_step=lambda step, record: records.append(record),
        scheduler=scheduler,
    )
    assert scheduler.last_epoch == 4
    x, y = data[3]
    with torch.no_grad():
        s, co_studied, before = student(x), teacher.eval()(x), original.eval()(x)
    tutored = records[3]["student_loss"]
    assert tutored == pytest.approx(distillation_loss(s, co_studied, y, 2.0, 0.5).item(), rel=1e-5)
    assert tutored != pytest.approx(distillation_loss(s, before, y, 2.0, 0.5).item(), rel=1e-3)


def test_schedule_validation():
    assert QKDSchedule(2, 3, 4).total_steps == 9
    assert [QKDSchedule(1, 1, 1).phase_of(i) for i in range(3)] == list(PHASES)
    with pytest.raises(ValueError, match="co_studying_steps must be >= 0"):
        QKDSchedule(1, -1, 1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        QKDSchedule(1, 1, 1, temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        QKDSchedule(1, 1, 1, alpha=2.0)
