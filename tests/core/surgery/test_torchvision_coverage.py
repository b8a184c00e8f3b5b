"""Every torchvision classifier family is fully covered (issue 17): the smallest builder of
each, at a small input (random init, 10 classes), is quantized at 4 bits with every layer
weight quantized, packed, and reloaded into a fresh model of the same builder (strict
``load_state_dict``, which MNASNet only passes with the module versions the packed file
keeps), which then computes exactly what the quantized model computed.
``benchmarks/bench_torchvision.py`` does the same for every builder and records the sizes."""

from __future__ import annotations

import pytest
import torch

import compressor
from benchmarks.bench_torchvision import FAMILIES, family_of, layer_weights

models = pytest.importorskip("torchvision.models")
pytestmark = pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")


def test_every_torchvision_classifier_belongs_to_a_tested_family():
    builders = models.list_models(module=models)
    assert len(builders) >= 80
    assert [b for b in builders if family_of(b) is None] == []
    for family, spec in FAMILIES.items():
        assert spec.smallest in builders and family_of(spec.smallest) == family


def test_each_family_is_tested_with_its_smallest_builder():
    """By parameter count at 10 classes, counted on the meta device (no memory, no init);
    builders whose init cannot run there (RegNet's) are checked by the benchmark's table."""
    counts = {}
    for builder in models.list_models(module=models):
        try:
            with torch.device("meta"):
                model = models.get_model(builder, num_classes=10)
        except NotImplementedError:
            continue
        counts[builder] = sum(p.numel() for p in model.parameters())
    for family, spec in FAMILIES.items():
        members = {b: n for b, n in counts.items() if family_of(b) == family}
        if members:
            assert min(members, key=members.get) == spec.smallest, members


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smallest_builder_quantizes_fully_packs_and_reloads_exactly(family, tmp_path):
    builder, kwargs, side = FAMILIES[family].smallest, FAMILIES[family].small, FAMILIES[family].side
    torch.manual_seed(0)
    model = models.get_model(builder, num_classes=10, **kwargs).eval()
    expected = layer_weights(model)
    compressor.quantize_(model, compressor.QuantConfig(bits=4))
    specs = compressor.quantization_specs(model)
    assert sorted(expected - set(specs)) == []
    assert {s.bits for s in specs.values()} == {4}

    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()

    path = tmp_path / f"{builder}.qd"
    size = compressor.save_packed(model, path, metadata={"arch": builder})
    state, metadata = compressor.load_packed(path)
    assert metadata == {"arch": builder} and path.stat().st_size == size
    assert hasattr(state, "_metadata")

    torch.manual_seed(1)  # other random weights, all replaced by the packed ones
    fresh = models.get_model(builder, num_classes=10, **kwargs).eval()
    fresh.load_state_dict(state)  # strict
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
