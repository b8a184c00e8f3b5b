"""Every method once on real CIFAR-10 images: a tiny CNN, a few thousand images, 200 steps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import data_path

import compressor
import compressor.surgery.activations
from compressor.training.quantized_distillation import quantized_distillation
from compressor.training.step import DistillConfig
from recipes import small_runs

CONFIG = small_runs.SmallRunConfig(train_images=3000, test_images=1000, steps=200)
CHANCE = 10.0


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    root = data_path("cifar10").parent
    data = small_runs.load_cifar10(root, CONFIG.train_images, CONFIG.test_images)
    teacher = small_runs.train_teacher(data, CONFIG)
    distilled = small_runs.run_fp32_student(data, CONFIG, teacher)
    return data, teacher, distilled


def _on_grid(model):
    """Uniform: re-quantizing changes nothing. Non-uniform (not idempotent: the bucket range
    shrinks): each bucket holds at most as many distinct values as there are points."""
    for name, spec in compressor.quantization_specs(model).items():
        weight = model.state_dict()[name]
        if spec.method == "uniform":
            assert torch.equal(spec.quantize(weight), weight), name
        else:
            for bucket in weight.reshape(-1).split(spec.bucket_size):
                assert bucket.unique().numel() <= spec.num_levels, name


def test_teacher_and_post_training_quantization(trained):
    data, teacher, distilled = trained
    assert small_runs.accuracy(teacher, data) > 3 * CHANCE
    assert small_runs.accuracy(distilled, data) > 3 * CHANCE
    pm = small_runs.run_post_training(distilled, bits=4)
    _on_grid(pm)
    assert small_runs.accuracy(pm, data) > 2.5 * CHANCE


def test_quantized_distillation_4bit(trained):
    data, teacher, _ = trained
    model, history = small_runs.run_quantized_distillation(data, CONFIG, teacher, bits=4)
    first = sum(r["distillation"] for r in history[:20]) / 20
    last = sum(r["distillation"] for r in history[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert small_runs.accuracy(model, data) > 3 * CHANCE
    _on_grid(model)
    assert all(s.bits == 4 for s in compressor.quantization_specs(model).values())


def test_teacher_logit_table_stands_in_for_the_teacher(trained):
    """Distilling from the table (the teacher run once per image and view) takes the same
    steps as running the teacher on every batch, which then never runs."""
    data, teacher, _ = trained
    table = small_runs.teacher_logit_table(teacher, data)
    assert table.shape == (CONFIG.train_images, 2, 10)
    with torch.no_grad():
        images = data["train_x"][100:164]
        torch.testing.assert_close(table[100:164, 0], teacher(images))
        torch.testing.assert_close(table[100:164, 1], teacher(images.flip(-1)))
    calls = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    histories = []
    try:
        for source, logits in ((teacher, None), (None, table)):
            calls.clear()
            student = compressor.quantize_(small_runs.student(CONFIG), compressor.QuantConfig())
            optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
            batches = small_runs.batches(data, CONFIG.batch_size, CONFIG.seed, logits)
            histories.append(
                quantized_distillation(student, source, batches, optimizer, 20, DistillConfig(2.0))
            )
            assert len(calls) == (20 if source is teacher else 0)
    finally:
        hook.remove()
    with_teacher, with_table = ([r["loss"] for r in h] for h in histories)
    assert with_table == pytest.approx(with_teacher, rel=1e-3)


def test_differentiable_quantization_with_bit_allocation(trained):
    data, teacher, distilled = trained
    model, points = small_runs.run_differentiable_quantization(
        data, CONFIG, teacher, distilled, bits=4
    )
    sizes = compressor.weight_sizes(distilled)
    assert sum(sizes[n] * math.log2(p) for n, p in points.items()) <= 4 * sum(sizes.values())
    assert min(points.values()) >= 8
    specs = compressor.quantization_specs(model)
    assert {n: s.num_levels for n, s in specs.items()} == points
    _on_grid(model)
    assert small_runs.accuracy(model, data) > 3 * CHANCE


def test_qkd_w4a4(trained):
    data, teacher, distilled = trained
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    model, history = small_runs.run_qkd(data, CONFIG, teacher, init=distilled)
    phases = [r["phase"] for r in history]
    assert [phases.count(p) for p in ("self-studying", "co-studying", "tutoring")] == [50, 50, 100]
    # W4A4 between the first and last layers, which stay in full precision
    quantized = compressor.quantization_specs(model)
    assert list(quantized) == ["4.weight"] and quantized["4.weight"].bits == 4
    assert len(compressor.activation_quantizers(model)) == 1
    assert small_runs.accuracy(model, data) > 3 * CHANCE
    for key, value in teacher.state_dict().items():  # the run trains a copy of the teacher
        assert torch.equal(value, teacher_state[key])


def test_ablation_rows_share_init_batches_and_quantizers(trained):
    """QAT, QAT + KD and QKD start from the same model on the same quantizers; with the
    distillation weight at zero, QAT + KD is QAT step for step; QKD's co-studying moves its
    copy of the teacher, and its report says by how much."""
    data, teacher, distilled = trained
    cfg = small_runs.SmallRunConfig(steps=24, train_images=3000, test_images=1000)
    qat, _ = small_runs.run_wa_quantization(data, cfg, teacher, distilled, 2, "qat")
    kd, _ = small_runs.run_wa_quantization(data, cfg, teacher, distilled, 2, "qat_kd")
    no_kd, _ = small_runs.run_wa_quantization(
        data, dataclasses.replace(cfg, alpha=0.0), teacher, distilled, 2, "qat_kd"
    )
    qkd, info = small_runs.run_wa_quantization(data, cfg, teacher, distilled, 2, "qkd")
    for model in (qat, kd, qkd):
        assert {s.bits for s in compressor.quantization_specs(model).values()} == {2}
        assert [q.bits for q in compressor.activation_quantizers(model)] == [2]
    assert all(
        torch.equal(a, b) for a, b in zip(qat.state_dict().values(), no_kd.state_dict().values())
    )
    assert not all(
        torch.equal(a, b) for a, b in zip(qat.state_dict().values(), kd.state_dict().values())
    )
    assert info["phases"] == {"self_studying": 6, "co_studying": 6, "tutoring": 12}
    assert info["teacher_accuracy"] == small_runs.accuracy(teacher, data)
    assert 0 < info["co_studied_teacher_accuracy"] <= 100
    with pytest.raises(ValueError, match="method must be one of"):
        small_runs.run_wa_quantization(data, cfg, teacher, distilled, 2, "lsq")


def test_runs_are_deterministic(trained):
    data, teacher, _ = trained
    cfg = small_runs.SmallRunConfig(steps=15)
    a, _ = small_runs.run_quantized_distillation(data, cfg, teacher, bits=2)
    b, _ = small_runs.run_quantized_distillation(data, cfg, teacher, bits=2)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
