"""The frozen-prefix feature cache (``pneumo.modeling.feature_cache``): the split must compose to the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_dataset
from model_helpers import tiny_model
from torch import nn

from pneumo.core.dataset import discover
from pneumo.core.errors import PneumoError
from pneumo.core.preprocess import PreprocessConfig
from pneumo.modeling.config import AugmentConfig
from pneumo.modeling.data import build_augment
from pneumo.modeling.feature_cache import CachedViews, build_views, split_model
from pneumo.modeling.models import freeze_backbone


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return tiny_model("efficientnet_lite0")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("stages", [0, 1, 2, 4, 7])
def test_prefix_then_suffix_equals_the_model(lite0: nn.Module, batch: torch.Tensor, stages: int) -> None:
    prefix, suffix = split_model(lite0, stages)
    prefix.eval(), suffix.eval()
    with torch.inference_mode():
        expected = lite0(batch)
        assert torch.allclose(suffix(prefix(batch)), expected, atol=1e-5)
        # features() is the pooled input of the classifier
        pooled = lite0.forward_head(lite0.forward_features(batch), pre_logits=True)  # type: ignore[operator]
        assert torch.allclose(suffix.features(prefix(batch)), pooled, atol=1e-5)


@pytest.mark.parametrize("stages", [1, 2, 4])
def test_split_matches_the_stages_freeze_backbone_trains(stages: int) -> None:
    """Every parameter freeze_backbone makes trainable must live in the suffix, none in the prefix.

    Otherwise training with the cache would silently leave an "unfrozen" stage frozen.
    """
    model = tiny_model("test_efficientnet")
    prefix, _ = split_model(model, stages)
    freeze_backbone(model, stages)
    prefix_params = {id(p) for p in prefix.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert not prefix_params & trainable
    assert prefix_params | trainable == {id(p) for p in model.parameters()}


def test_trainable_stages_zero_works_for_any_timm_model(batch: torch.Tensor) -> None:
    model = tiny_model("test_resnet")
    prefix, suffix = split_model(model, 0)
    with torch.inference_mode():
        features = prefix(batch)
        assert features.shape == (2, model.num_features)
        assert torch.allclose(suffix(features), model(batch), atol=1e-5)
        assert torch.equal(suffix.features(features), features)


def test_unsupported_split_is_a_pneumo_error(lite0: nn.Module) -> None:
    with pytest.raises(PneumoError) as info:
        split_model(tiny_model("test_resnet"), 1)
    assert info.value.code == "feature_cache_unsupported"
    assert "--unfreeze-stages 0" in info.value.message
    with pytest.raises(PneumoError):
        split_model(lite0, len(lite0.blocks) + 1)  # type: ignore[arg-type]


def test_build_views_plain_view_matches_prefix_and_is_cached(tmp_path: Path) -> None:
    root = write_tiny_dataset(tmp_path / "data", n_per_class=3)
    samples = discover(root, "train")
    config = PreprocessConfig(32)
    model = tiny_model("test_efficientnet")
    prefix, _ = split_model(model, 1)
    augment = build_augment(AugmentConfig(rotation_deg=20, hflip=0.5))
    views = build_views(prefix, samples, config, augment, 2, cache_dir=tmp_path / "cache", batch_size=4)
    assert views.dtype == torch.float16 and views.shape[:2] == (3, len(samples))
    from pneumo.modeling.data import XrayDataset

    plain = torch.stack([XrayDataset(samples, config)[i][0] for i in range(len(samples))])
    with torch.inference_mode():
        assert torch.allclose(views[0].float(), prefix(plain), atol=2e-2, rtol=2e-3)
    assert not torch.allclose(views[1], views[0])  # augmented views differ from the plain one
    assert len(list((tmp_path / "cache").glob("view-*.safetensors"))) == 3

    # A second run reads the cache: the prefix is never called.
    again = build_views(_Broken(), samples, config, augment, 2, cache_dir=tmp_path / "cache")
    assert torch.equal(again, views)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the cache was not used")


def test_cached_views_random_for_training_plain_for_validation() -> None:
    views = torch.stack([torch.full((4, 2), float(v)) for v in range(3)]).to(torch.float16)
    train = CachedViews(views, [0, 1, 0, 1], random_view=True)
    val = CachedViews(views, [0, 1, 0, 1], random_view=False)
    torch.manual_seed(0)
    seen = {float(train[0][0][0]) for _ in range(30)}
    assert seen == {0.0, 1.0, 2.0}
    assert {float(val[i][0][0]) for i in range(4)} == {0.0}
    assert val[1][1] == 1 and val[1][0].dtype == torch.float32
