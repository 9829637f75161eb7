"""The lung localizer: a tiny CNN that regresses the lung box on a 64 px thumbnail, trained on pseudo-labels.

Why learned rather than the classical labeler itself: the labeler (:func:`pneumo.modeling.localizer_data.pseudo_label`)
needs scipy, runs ~5 ms, is right only on well-framed films with aerated lungs (it refuses 37% of
PNEUMONIA films) and sees only the lungs the frame shows. The regressor learns its boxes on the
films where it is right, under random crops, pads, aspect changes, rotations and burned-in text
that move the whole-lung box with the image, and so returns the same anatomy whatever the
framing, on every film, in under 1 ms with ONNX Runtime only (:class:`pneumo.core.framing.Framer`).

Train and write the graph (the validation patients of ``train_val_samples(root, "binary", 0.15, 0)``
are never read)::

    from pneumo.modeling.localizer import train_localizer
    train_localizer("../shared/data/chest_xray_224", "src/pneumo/assets/localizer/lungbox-v1.onnx")
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pneumo.core.dataset import Sample, train_val_samples
from pneumo.core.errors import DataError
from pneumo.core.framing import LOCALIZER_INPUT, LOCALIZER_OUTPUT, thumbnail
from pneumo.modeling.localizer_data import BOX_RANGE, VIEW_SOURCE, negative_view, pseudo_label, random_view

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalizerTrainConfig:
    """The recipe of ``lungbox-v1`` (every field recorded in the asset's README)."""

    input_size: int = 64
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    #: Share of samples that are synthetic non-X-rays (target "no lungs").
    negative_share: float = 0.08
    seed: int = 0
    val_fraction: float = 0.15
    split_seed: int = 0
    workers: int = 1


class TinyBoxNet(nn.Module):
    """Five stride-2 stages (64 -> 2 px) and a small head: box corners and a "lungs found" logit.

    The head flattens the 2 x 2 map instead of pooling it: where things are is the whole point.
    ~100 k parameters, ~0.4 MB as float32 ONNX.
    """

    def __init__(self, input_size: int = 64, widths: tuple[int, ...] = (16, 24, 32, 48, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 1
        for width in widths:
            layers += [
                nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        side = input_size // 2 ** len(widths)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * side * side, 64), nn.ReLU(inplace=True), nn.Linear(64, 5)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs: 4 box logits then the "found" logit."""
        return self.head(self.features(x))


class _Deployed(nn.Module):
    """What the ONNX graph computes: ``(x0, y0, x1, y1, p_found)``, corners in ``BOX_RANGE``, p in [0, 1]."""

    def __init__(self, net: TinyBoxNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.net(x)
        return torch.cat([_corners(outputs), torch.sigmoid(outputs[:, 4:])], dim=1)


def _corners(outputs: torch.Tensor) -> torch.Tensor:
    """Box logits -> corners in ``BOX_RANGE`` (the lungs may continue past the frame)."""
    low, high = BOX_RANGE
    return low + (high - low) * torch.sigmoid(outputs[:, :4])


class _Views(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]):
    """Random views of the labelled films, and negatives; sample ``i`` of epoch ``e`` is seeded by (seed, e, i)."""

    def __init__(self, films: list[Image.Image], masks: list[Image.Image | None], config: LocalizerTrainConfig) -> None:
        self.films, self.masks, self.config = films, masks, config
        self.epoch = 0
        self.n_negative = round(len(films) * config.negative_share / (1 - config.negative_share))

    def __len__(self) -> int:
        return len(self.films) + self.n_negative

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        size = self.config.input_size
        if index >= len(self.films):
            pixels, box, found, weight = negative_view(rng, size), np.zeros(4, np.float32), 0.0, 0.0
        elif (mask := self.masks[index]) is None:
            # A film the labeler did not trust (mostly opacified lungs): still lungs, box unknown.
            pixels, box, found, weight = thumbnail(self.films[index], size)[0], np.zeros(4, np.float32), 1.0, 0.0
        else:
            pixels, box, found = random_view(self.films[index], mask, rng, size)
            weight = found
        return (torch.from_numpy(pixels), torch.from_numpy(box), torch.tensor(found), torch.tensor(weight))


def label_films(samples: list[Sample]) -> tuple[list[Image.Image], list[Image.Image | None]]:
    """Decode every film at ``VIEW_SOURCE`` px and pseudo-label it (``None`` where the labeler is unsure)."""
    films: list[Image.Image] = []
    masks: list[Image.Image | None] = []
    for sample in samples:
        with Image.open(sample.path) as raw:
            film = raw.convert("L").resize((VIEW_SOURCE, VIEW_SOURCE), Image.Resampling.BILINEAR)
        label = pseudo_label(film)
        films.append(film)
        mask = Image.fromarray(label.mask.astype(np.uint8) * 255, mode="L")
        masks.append(mask.resize(film.size, Image.Resampling.NEAREST) if label.accepted else None)
    return films, masks


def _loss(outputs: torch.Tensor, box: torch.Tensor, found: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    corners = _corners(outputs)
    box_loss = (nn.functional.smooth_l1_loss(corners, box, reduction="none", beta=0.02).sum(1) * weight).sum()
    found_loss = nn.functional.binary_cross_entropy_with_logits(outputs[:, 4], found)
    return box_loss / weight.sum().clamp(min=1.0) * 10.0 + found_loss


def train_localizer(root: str | Path, out: str | Path, config: LocalizerTrainConfig | None = None) -> dict[str, Any]:
    """Pseudo-label the training side of the patient split, train :class:`TinyBoxNet`, write the ONNX graph.

    Args:
        root: dataset root in the Kaggle layout (``root/train/{NORMAL,PNEUMONIA}``).
        out: path of the graph to write (the bundle's ``localizer.onnx``).
        config: the recipe; defaults to :class:`LocalizerTrainConfig`.

    Returns:
        What was done: counts of films and labels, the final losses, seconds spent.

    Raises:
        DataError: when the training side holds no film the labeler accepts.
    """
    config = config or LocalizerTrainConfig()
    torch.manual_seed(config.seed)
    train, _, description = train_val_samples(root, "binary", config.val_fraction, config.split_seed)
    start = time.perf_counter()
    films, masks = label_films(train)
    accepted = sum(m is not None for m in masks)
    if accepted == 0:
        raise DataError(f"The pseudo-labeler accepted none of the {len(films)} training films under {root}.")
    log.info("localizer: %d of %d training films pseudo-labelled (%s)", accepted, len(films), description)
    views = _Views(films, masks, config)
    net = TinyBoxNet(config.input_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(
        views,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=config.workers,
        drop_last=True,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(config.seed),
    )
    steps = config.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps, pct_start=0.1)
    history: list[float] = []
    for epoch in range(config.epochs):
        views.epoch = epoch
        net.train()
        total, batches = 0.0, 0
        for pixels, box, found, weight in loader:
            loss = _loss(net(pixels), box, found, weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        history.append(total / max(batches, 1))
        log.info("localizer: epoch %d loss %.4f (%.0f s)", epoch, history[-1], time.perf_counter() - start)
    export_localizer(net, out, config.input_size)
    return {
        "split": description,
        "training_films": len(films),
        "pseudo_labelled": accepted,
        "loss_per_epoch": [round(v, 5) for v in history],
        "seconds": round(time.perf_counter() - start, 1),
        "config": config.__dict__,
    }


def export_localizer(net: TinyBoxNet, out: str | Path, input_size: int = 64, opset: int = 18) -> Path:
    """Write the localizer graph (input ``thumbnail`` (N, 1, S, S), output ``box_found`` (N, 5)) and check it.

    The check runs the graph with ONNX Runtime on random inputs against torch; a mismatch raises.
    """
    import onnxruntime as ort

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    deployed = _Deployed(net).eval()
    example = torch.rand(2, 1, input_size, input_size) * 2 - 1
    # The dynamo exporter (the project's; the TorchScript one is deprecated), one self-contained file.
    torch.onnx.export(
        deployed,
        (example,),
        str(out),
        input_names=[LOCALIZER_INPUT],
        output_names=[LOCALIZER_OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = deployed(example).numpy()
    got = session.run([LOCALIZER_OUTPUT], {LOCALIZER_INPUT: example.numpy()})[0]
    if not np.allclose(got, expected, atol=1e-4):
        raise RuntimeError(f"The exported localizer differs from torch by {np.abs(got - expected).max():.2e}.")
    return out


def load_pseudo_labels(samples: list[Sample]) -> dict[str, tuple[float, float, float, float] | None]:
    """The pseudo-label box of each accepted film (``None`` where the labeler is unsure), by path."""
    boxes: dict[str, tuple[float, float, float, float] | None] = {}
    for sample in samples:
        with Image.open(sample.path) as raw:
            label = pseudo_label(raw.convert("L"))
        boxes[str(sample.path)] = label.box() if label.accepted else None
    return boxes
