"""Module shapes follow the teacher's feature_info, for two backbones and every architecture."""

from __future__ import annotations

import pytest
import torch

from crd_model.anomaly_map import AnomalyMapGenerator, gaussian_blur, image_scores
from crd_model.config import CRDConfig
from crd_model.loss import distillation_loss
from crd_model.torch_model import CRDModel, create_model


@pytest.mark.parametrize(
    ("architecture", "input_weight"), [("crd", 0.0), ("rgb", 0.0), ("3d", 0.0), ("fused", 0.0), ("crd", 8.0)]
)
def test_every_architecture_reconstructs_the_teacher_scales(architecture, input_weight):
    model = create_model(architecture=architecture, image_size=128, teacher_input_weight=input_weight).train()
    rgb, x3d = torch.rand(2, 3, 128, 128), torch.rand(2, 3, 128, 128)
    feats = model.encode(rgb if model.config.uses_rgb else None, x3d if model.config.uses_3d else None)
    outputs = model.run_branches(feats)
    assert set(outputs) == set(model.config.branches)
    for out in outputs.values():
        for t, d, m in zip(out.target, out.decoded, out.mixed, strict=True):
            assert t.shape == d.shape == m.shape
        terms = out.loss_terms()
        expected = {"decoder", "filter", "amplifier", "output"} if architecture == "crd" else {"decoder"}
        assert set(terms) == expected
        assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    maps = model.eval().branch_maps(rgb, x3d)
    assert all(m.shape == (2, 128, 128) for m in maps.values())


def test_crd_branch_modules_are_built_from_feature_info_of_a_wide_resnet():
    model = CRDModel(CRDConfig(backbone="wide_resnet50_2", image_size=64), teacher_weights=None)
    assert model.teacher.channels == [256, 512, 1024]
    branch = model.branches["rgb"]
    assert [p.head.out_channels for p in branch.filter.projections] == [256, 512, 1024]
    # Every scale is squeezed down to the bottleneck grid (stride 32): 3, 2 and 1 halvings.
    assert [len(p.down) for p in branch.filter.projections] == [3, 2, 1]
    assert branch.bottleneck.out_channels == 2048
    with torch.no_grad():
        feats = model.encode(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
        out = model.run_branch(feats, "3d")
    assert [tuple(f.shape[1:]) for f in out.mixed] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]


def test_amplifier_mix_starts_equal_and_is_learnable():
    model = create_model(image_size=64)
    amp = model.branches["rgb"].amplifier
    a = torch.ones(1, 2, 3, 3)
    b = torch.zeros(1, 2, 3, 3)
    assert torch.allclose(amp.mix(0, a, b), torch.full_like(a, 0.5))
    assert amp.mix_logits.requires_grad


def test_only_the_students_are_trainable():
    model = create_model(image_size=64)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"branches"}


def test_cosine_loss_is_zero_for_identical_and_positive_otherwise():
    a = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    assert distillation_loss(a, a).abs() < 1e-6
    assert distillation_loss([-x for x in a], a) == pytest.approx(4.0, abs=1e-5)  # 2 scales x (1 - (-1))


def test_the_hard_loss_adds_the_mean_of_each_scales_hardest_tenth():
    torch.manual_seed(0)
    target = [torch.randn(2, 8, 5, 4), torch.randn(2, 16, 3, 3)]
    student = [t.clone() for t in target]
    student[0][0, :, 0, :] = -target[0][0, :, 0, :]  # 4 of 40 positions (a tenth) reversed: 1 - cos = 2
    position = distillation_loss(student, target, "position")
    assert position == pytest.approx(8 / 40, abs=1e-5)
    assert distillation_loss(student, target, "hard") == pytest.approx(8 / 40 + 2.0, abs=1e-5)
    assert distillation_loss(target, target, "hard").abs() < 1e-6


def test_the_magnitude_loss_sees_a_scaled_student_the_cosine_loss_does_not():
    a = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    doubled = [2 * x for x in a]
    assert distillation_loss(doubled, a, "position").abs() < 1e-6  # same directions: blind
    assert distillation_loss(doubled, a, "magnitude") == pytest.approx(2.0, abs=1e-4)  # 2 scales x (2-1)^2
    assert distillation_loss(a, a, "magnitude").abs() < 1e-6
    with pytest.raises(ValueError, match="magnitude"):
        distillation_loss(a, a, "length")


def test_fusion_standardises_branches_and_blur_preserves_mass():
    m = torch.zeros(1, 33, 33)
    m[0, 16, 16] = 1.0
    blurred = gaussian_blur(m, 2.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 16, 16] == blurred.max()
    head = AnomalyMapGenerator(("a", "b"), sigma=0)
    head.set_statistics({"a": (1.0, 2.0), "b": (1.0, 1.0)})
    fused, _ = head({"a": torch.full((1, 8, 8), 3.0), "b": torch.full((1, 8, 8), 1.0)})
    assert torch.allclose(fused, torch.full((1, 8, 8), 1.0))
    assert image_scores(torch.arange(8.0).view(2, 2, 2)).tolist() == [3.0, 7.0]


def test_image_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        CRDConfig(image_size=200)
