"""pneumo.core.dataset and pneumo.modeling.data: names -> patients, discovery, patient splits, augmentation, loaders."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pneumo.core import dataset
from pneumo.core.dataset import Sample, dataset_summary, discover, patient_id, patient_split, train_val_samples
from pneumo.core.decode import read_image
from pneumo.core.errors import DataError, InvalidImageError
from pneumo.core.preprocess import PreprocessConfig, preprocess
from pneumo.modeling.config import AugmentConfig
from pneumo.modeling.data import XrayDataModule, XrayDataset, balanced_sampler, build_augment, class_weights

CFG = PreprocessConfig(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _ratio(samples: list[Sample]) -> float:
    return sum(s.label for s in samples) / len(samples)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1_bacteria_1.jpeg", "person1"),
        ("person1_virus_2.jpeg", "person1"),
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person447_virus_921_1.jpeg", "person447"),
        ("IM-0117-0001.jpeg", "IM-0117"),
        ("IM-0429-0001-0002.jpeg", "IM-0429"),
        ("NORMAL2-IM-0657-0001.jpeg", "NORMAL2-IM-0657"),
        ("NORMAL2-IM-0429-0001-0001.jpeg", "NORMAL2-IM-0429"),
        ("/some/dir/IM-0001-0001.png", "IM-0001"),
        ("scan_42.jpeg", "scan_42"),
        ("IM-0001.jpeg", "IM-0001"),
        ("personX_bacteria_1.jpeg", "personX_bacteria_1"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert patient_id(name) == patient


def test_patient_id_keeps_normal2_apart_from_im() -> None:
    assert patient_id("IM-0002-0001.jpeg") != patient_id("NORMAL2-IM-0002-0001.jpeg")


def test_discover_kaggle_root_binary(tiny_dataset: Path) -> None:
    samples = discover(tiny_dataset, "train")
    assert len(samples) == 24
    assert Counter(s.label for s in samples) == {0: 12, 1: 12}
    assert all((s.label == 0) == (s.path.parent.name == "NORMAL") for s in samples)
    assert samples == sorted(samples, key=lambda s: (s.label, s.path))
    person1 = [s for s in samples if s.patient == "person1"]
    assert {s.kind for s in person1} == {"bacteria", "virus"}
    assert {s.label for s in person1} == {1}
    assert discover(tiny_dataset, "train") == samples  # deterministic


def test_discover_class_folders_directly_and_3class(tiny_dataset: Path) -> None:
    samples = discover(tiny_dataset / "train", None, "3class")
    names = dataset.LABEL_MODES["3class"]
    by_kind = {s.kind: s.label for s in samples}
    assert by_kind == {"normal": names.index("NORMAL"), "bacteria": names.index("BACTERIA"), "virus": 2}
    assert Counter(s.kind for s in samples) == {"normal": 12, "bacteria": 8, "virus": 4}


def test_discover_ignores_non_images_and_hidden_files(tiny_dataset: Path) -> None:
    normal = tiny_dataset / "train" / "NORMAL"
    (normal / ".DS_Store").write_bytes(b"junk")
    (normal / "notes.txt").write_text("x")
    shutil.copy(normal / "IM-0001-0001.jpeg", normal / "._IM-0001-0001.jpeg")
    shutil.copy(normal / "IM-0001-0001.jpeg", normal / "IM-0099-0001.PNG")
    paths = {s.path.name for s in discover(tiny_dataset, "train")}
    assert "IM-0099-0001.PNG" in paths
    assert not {".DS_Store", "notes.txt", "._IM-0001-0001.jpeg"} & paths


def test_discover_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split='train'") as err:
        discover(tiny_dataset)  # a Kaggle root without a split
    assert err.value.code == "bad_layout"
    with pytest.raises(DataError, match="is not a folder"):
        discover(tiny_dataset, "test")
    with pytest.raises(DataError, match="Unknown label_mode"):
        discover(tiny_dataset, "train", "multi")
    bad = tmp_path / "bad"
    (bad / "NORMAL").mkdir(parents=True)
    (bad / "Pneumonia").mkdir()
    with pytest.raises(DataError, match=r"no PNEUMONIA/ folder \(it holds NORMAL/, Pneumonia/\)"):
        discover(bad)
    (bad / "PNEUMONIA").mkdir()
    shutil.copy(tiny_dataset / "train" / "NORMAL" / "IM-0001-0001.jpeg", bad / "NORMAL")
    with pytest.raises(DataError, match="holds no images") as err:
        discover(bad)
    assert err.value.code == "empty_class"


def test_discover_3class_needs_type_in_name(tiny_dataset: Path) -> None:
    pneumonia = tiny_dataset / "train" / "PNEUMONIA"
    shutil.copy(pneumonia / "person1_bacteria_1.jpeg", pneumonia / "scan_7.jpeg")
    assert discover(tiny_dataset, "train")[-1].kind == "pneumonia"  # binary: fine
    with pytest.raises(DataError, match=r"scan_7\.jpeg.*neither 'bacteria' nor 'virus'"):
        discover(tiny_dataset, "train", "3class")


def _fake_samples(n_patients: int = 400, seed: int = 1) -> list[Sample]:
    """~1000 samples shaped like the real data: 1-5 films per patient, ~26% normal, bacteria:virus ~2:1."""
    rng = random.Random(seed)
    samples = []
    for p in range(n_patients):
        kind = rng.choices(["normal", "bacteria", "virus"], weights=[26, 49, 25])[0]
        for m in range(rng.choice([1, 1, 2, 3, 5])):
            patient = f"IM-{p:04d}" if kind == "normal" else f"person{p}"
            # A few pneumonia patients have films of both types, as in the real data.
            film_kind = "virus" if kind == "bacteria" and m == 2 else kind
            samples.append(Sample(Path(f"{patient}_{m}.jpeg"), int(kind != "normal"), patient, film_kind))
    return samples


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_split_no_leak_and_class_ratio_realistic(seed: int) -> None:
    samples = _fake_samples()
    assert len(samples) > 800
    train, val = patient_split(samples, val_fraction=0.15, seed=seed)
    assert sorted(train + val, key=str) == sorted(samples, key=str)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert abs(_ratio(val) - _ratio(samples)) < 0.04
    assert abs(len(val) / len(samples) - 0.15) < 0.01
    kinds_val, kinds_all = Counter(s.kind for s in val), Counter(s.kind for s in samples)
    assert abs(kinds_val["virus"] / len(val) - kinds_all["virus"] / len(samples)) < 0.05


def test_patient_split_is_seeded() -> None:
    samples = _fake_samples()
    assert patient_split(samples, seed=3) == patient_split(samples, seed=3)
    assert patient_split(samples, seed=3)[1] != patient_split(samples, seed=4)[1]


def test_patient_split_tiny(tiny_dataset: Path) -> None:
    samples = discover(tiny_dataset, "train")
    train, val = patient_split(samples, val_fraction=0.3, seed=0)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert {s.label for s in val} == {0, 1}
    with pytest.raises(DataError, match="val_fraction"):
        patient_split(samples, val_fraction=1.0)


def test_train_val_samples_carves_or_uses_official_val(tiny_dataset: Path) -> None:
    train, val, how = train_val_samples(tiny_dataset, val_fraction=0.25, seed=2)
    assert how == "carved 25% by patient from train (seed 2)"
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == 24
    shutil.copytree(tiny_dataset / "train", tiny_dataset / "val")
    _, val, how = train_val_samples(tiny_dataset, min_val_images=100)
    assert how.startswith("carved 15% by patient from train (seed 0)") and "only 24 images" in how
    assert all(s.path.parts[-3] == "train" for s in val)
    train, val, how = train_val_samples(tiny_dataset, min_val_images=10)
    assert how == "official val/"
    assert len(train) == 24 and all(s.path.parts[-3] == "val" for s in val)


def test_augment_never_mutates_input_and_is_random() -> None:
    torch.manual_seed(0)
    augment = build_augment(AugmentConfig())
    x = torch.rand(1, 32, 32)
    before = x.clone()
    outs = [augment(x) for _ in range(3)]
    assert torch.equal(x, before)
    assert all(o is not x and o.shape == x.shape for o in outs)
    assert not torch.equal(outs[0], outs[1])
    assert all(float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outs)


def test_augment_disabled_is_identity_copy() -> None:
    x = torch.rand(1, 16, 16)
    for cfg in (AugmentConfig(enabled=False), AugmentConfig(0, 0, 0, 0, 0, 0)):
        out = build_augment(cfg)(x)
        assert torch.equal(out, x) and out is not x
        out += 1
        assert float(x.max()) <= 1.0


def test_xray_dataset_matches_inference_preprocessing(tiny_dataset: Path) -> None:
    samples = discover(tiny_dataset, "train")
    dataset = XrayDataset(samples, CFG)
    tensor, label = dataset[len(samples) - 1]
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert label == 1 and isinstance(label, int)
    expected = preprocess(read_image(samples[-1].path, draft_size=32).image, CFG)
    assert torch.equal(tensor, torch.from_numpy(expected))  # the very function the Predictor calls
    assert torch.equal(tensor[0], tensor[2])
    # Normalized with the config's mean/std: (x - 0.5) / 0.25 spans [-2, 2] for x in [0, 1].
    assert -2.0 <= float(tensor.min()) < -1.0 and 0.0 < float(tensor.max()) <= 2.0
    with pytest.raises(DataError, match="label_mode"):
        XrayDataset([Sample(samples[0].path, 2, "p", "virus")], CFG, label_mode="binary")


def test_xray_dataset_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InvalidImageError, match=r"broken\.jpeg"):
        XrayDataset([Sample(bad, 0, "broken", "normal")], CFG)[0]


def test_class_weights_and_sampler() -> None:
    samples = [Sample(Path(f"{i}.png"), int(i >= 10), str(i), "x") for i in range(40)]  # 10 vs 30
    weights = class_weights(samples, 2)
    assert torch.allclose(weights, torch.tensor([1.5, 0.5]))
    assert float(weights.mean()) == pytest.approx(1.0)
    with pytest.raises(DataError):
        class_weights(samples, 3)
    many = samples * 50
    drawn = Counter(many[i].label for i in balanced_sampler(many, seed=0))
    assert abs(drawn[0] / sum(drawn.values()) - 0.5) < 0.05


def test_dataset_summary(tiny_dataset: Path) -> None:
    summary = dataset_summary(discover(tiny_dataset, "train", "3class"), "3class")
    assert summary["counts"] == {"NORMAL": 12, "BACTERIA": 8, "VIRUS": 4}
    assert summary["n_images"] == 24 and summary["n_patients"] == 16


def test_datamodule_augments_train_only(tiny_dataset: Path) -> None:
    dm = XrayDataModule(tiny_dataset, CFG, batch_size=4, val_fraction=0.25, seed=0)
    dm.setup("fit")
    assert dm.split_description == "carved 25% by patient from train (seed 0)"
    assert not {s.patient for s in dm.train_samples} & {s.patient for s in dm.val_samples}
    assert dm.class_weights is not None and dm.class_weights.shape == (2,)
    assert dm.train_dataset is not None and dm.val_dataset is not None
    torch.manual_seed(0)
    assert torch.equal(dm.val_dataset[0][0], dm.val_dataset[0][0])
    assert not torch.equal(dm.train_dataset[0][0], dm.train_dataset[0][0])
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    val_images = torch.cat([x for x, _ in dm.val_dataloader()])
    assert val_images.shape[0] == len(dm.val_samples)
    assert dm.summary()["train"]["n_images"] == len(dm.train_samples)
    with pytest.raises(DataError, match="no test split"):
        dm.test_dataloader()


def test_datamodule_balance_options(tiny_dataset: Path) -> None:
    shutil.copytree(tiny_dataset / "train", tiny_dataset / "test")
    dm = XrayDataModule(tiny_dataset, CFG, balance="sampler", augment=AugmentConfig(enabled=False))
    dm.setup()
    assert dm.class_weights is None
    assert isinstance(dm.train_dataloader().sampler, torch.utils.data.WeightedRandomSampler)
    assert len(dm.test_dataloader().dataset) == 24  # type: ignore[arg-type]
    with pytest.raises(DataError, match="balance"):
        XrayDataModule(tiny_dataset, CFG, balance="oversample")


def test_real_train_split_has_no_patient_leak(shared_data: Path) -> None:
    root = shared_data / "chest_xray_224"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    samples = discover(root, "train", "3class")
    assert dataset_summary(samples, "3class")["counts"] == {"NORMAL": 1341, "BACTERIA": 2530, "VIRUS": 1345}
    train, val, how = train_val_samples(root, "binary", val_fraction=0.15, seed=0)
    assert how == "carved 15% by patient from train (seed 0)"
    assert len(train) + len(val) == 5216
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert abs(_ratio(val) - 3875 / 5216) < 0.01
    assert abs(len(val) / 5216 - 0.15) < 0.01
    val_kinds = Counter(s.kind for s in val)
    assert abs(val_kinds["virus"] / len(val) - 1345 / 5216) < 0.02
