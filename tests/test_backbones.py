"""The offline teacher weights land on the right tensors, checked against an independent forward."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from crd_model.backbones import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKAGED_WEIGHTS,
    Teacher,
    map_state_dict_in_order,
    packaged_weights,
    read_state_dict,
)

# EfficientNet-Lite as published: the strides of its seven stages (Tan & Le 2019; lite: no SE, ReLU6).
# The stages' repeats grow with the variant's depth; each stage ends where the blocks' width changes.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
LITE_TEACHERS = sorted(PACKAGED_WEIGHTS)


def _source_weights(backbone: str = "efficientnet_lite0") -> dict[str, torch.Tensor]:
    module_name, class_name, _ = PACKAGED_WEIGHTS[backbone]
    module = pytest.importorskip(module_name)
    return read_state_dict(getattr(module, class_name).get_model_file_path())


def _stage_repeats(sd: dict) -> list[int]:
    widths = []
    while f"_blocks.{len(widths)}._project_conv.weight" in sd:
        widths.append(sd[f"_blocks.{len(widths)}._project_conv.weight"].shape[0])
    repeats = [1]
    for before, after in itertools.pairwise(widths):
        if after == before:
            repeats[-1] += 1
        else:
            repeats.append(1)
    return repeats


def _bn(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.batch_norm(
        x,
        sd[f"{name}.running_mean"],
        sd[f"{name}.running_var"],
        sd[f"{name}.weight"],
        sd[f"{name}.bias"],
        training=False,
        eps=eps,
    )


def reference_forward(sd: dict, x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EfficientNet-Lite written from the checkpoint's own key names (original naming), not timm's.

    Returns logits and the output of the last block of every stage.
    """
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_stem.weight"], stride=2, padding=1), sd, "_bn0", eps))
    stage_outputs = []
    b = 0
    for repeats, stride in zip(_stage_repeats(sd), STAGE_STRIDES, strict=True):
        for r in range(repeats):
            p = f"_blocks.{b}"
            s = stride if r == 0 else 1
            inp = x
            if f"{p}._expand_conv.weight" in sd:
                x = F.relu6(_bn(F.conv2d(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0", eps))
            w = sd[f"{p}._depthwise_conv.weight"]
            x = F.conv2d(x, w, stride=s, padding=w.shape[-1] // 2, groups=w.shape[0])
            x = F.relu6(_bn(x, sd, f"{p}._bn1", eps))
            x = _bn(F.conv2d(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2", eps)
            if s == 1 and inp.shape == x.shape:
                x = x + inp
            b += 1
        stage_outputs.append(x)
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1", eps))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"]), stage_outputs


def test_stage_repeats_read_from_the_checkpoint_are_lite0s_published_ones():
    assert _stage_repeats(_source_weights("efficientnet_lite0")) == [1, 2, 2, 3, 3, 4, 1]


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    return _source_weights()


@pytest.mark.parametrize("backbone", LITE_TEACHERS)
def test_mapping_reproduces_the_reference_network(backbone):
    source = _source_weights(backbone)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 96)
    model = timm.create_model(backbone, pretrained=False).eval()
    model.load_state_dict(packaged_weights(backbone), strict=True)
    with torch.no_grad():
        expected, _ = reference_forward(source, x)
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # ImageNet weights, not a random init: predictions are far from uniform over 1000 classes.
    assert got.softmax(-1).max() > 0.01


def test_reference_catches_a_wrong_mapping(source):
    """The check above can fail: swapping two same-shaped tensors changes the output."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 96, 96)
    broken = dict(source)
    broken["_bn0.weight"], broken["_bn0.bias"] = source["_bn0.bias"], source["_bn0.weight"]
    with torch.no_grad():
        good, _ = reference_forward(source, x)
        bad, _ = reference_forward(broken, x)
    assert (good - bad).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("backbone", "channels"),
    [
        ("efficientnet_lite0", [24, 40, 112]),
        ("efficientnet_lite1", [24, 40, 112]),
        ("efficientnet_lite2", [24, 48, 120]),
    ],
)
def test_teacher_features_are_the_reference_stage_outputs(backbone, channels):
    source = _source_weights(backbone)
    teacher = Teacher(backbone, (1, 2, 3), weights=True)
    assert teacher.pretrained
    assert teacher.channels == channels and teacher.reductions == [4, 8, 16]
    torch.manual_seed(1)
    img = torch.rand(2, 3, 128, 128)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _, stages = reference_forward(source, (img - mean) / std)
        feats = teacher(img)
    # timm's feature stages 1, 2, 3 are the ends of the published stages 2, 3 and 5.
    for f, ref in zip(feats, (stages[1], stages[2], stages[4]), strict=True):
        assert f.shape == ref.shape
        assert torch.allclose(f, ref, atol=1e-4, rtol=1e-4)


def test_the_input_joins_the_shallowest_features_when_asked():
    plain = Teacher("efficientnet_lite0", (1, 2, 3), weights=True)
    with_input = Teacher("efficientnet_lite0", (1, 2, 3), weights=True, input_weight=8.0)
    assert with_input.channels == [plain.channels[0] + 3, *plain.channels[1:]]
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(img), with_input(img)
    assert torch.equal(b[0][:, :-3], a[0])
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    # each stride-4 cell holds its 4 x 4 pixels' mean, normalised as the teacher's input, times the weight
    cells = ((img - mean) / std).view(2, 3, 16, 4, 16, 4).mean(dim=(3, 5))
    assert torch.allclose(b[0][:, -3:], 8.0 * cells, atol=1e-5)


def test_teacher_stays_frozen_in_train_mode():
    teacher = Teacher("efficientnet_lite0", (1, 2, 3), weights=True)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_map_in_order_rejects_shape_mismatch():
    src = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape mismatch"):
        map_state_dict_in_order(src, {"x": torch.zeros(3), "y": torch.zeros(2)})
    with pytest.raises(ValueError, match="cannot map"):
        map_state_dict_in_order(src, {"x": torch.zeros(2)})


def test_wide_resnet_teacher_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    ref = timm.create_model("wide_resnet50_2", pretrained=False).eval()
    path = tmp_path / "wrn50.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    teacher = Teacher("wide_resnet50_2", (1, 2, 3), weights=path)
    assert teacher.channels == [256, 512, 1024]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        feats = teacher(x)
        normed = (x - teacher.mean) / teacher.std
        y = ref.maxpool(ref.act1(ref.bn1(ref.conv1(normed))))
        y = ref.layer1(y)
    assert torch.allclose(feats[0], y, atol=1e-5)


def test_wide_resnet_without_weights_is_refused_and_bad_files_fail(tmp_path):
    with pytest.raises(ValueError, match="no offline weights"):
        Teacher("wide_resnet50_2", (1, 2, 3), weights=True)
    with pytest.raises(FileNotFoundError):
        Teacher("wide_resnet50_2", (1, 2, 3), weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="lack"):
        Teacher("wide_resnet50_2", (1, 2, 3), weights=bad)
