"""A set of images that are not chest X-rays, built offline from pictures that ship with PyPI packages.

Used by ``benchmarks/ood_eval.py`` to measure how many non-X-rays the OOD gate lets through.
Every image is made deterministically (seeded), so the measured rate is reproducible:

- ``photo``: scikit-image's sample photos (astronaut, coffee, chelsea, rocket, ...), scikit-learn's
  (china, flower) and matplotlib's (Grace Hopper), each also as grayscale and two crops.
- ``face``: portraits (astronaut, Grace Hopper crops) and the Labeled-Faces-in-the-Wild faces shipped
  with scikit-image, upscaled.
- ``texture``: brick, grass, gravel, checkerboards, coins, the moon, the Hubble deep field.
- ``document``: skimage's ``page`` and ``text`` plus rendered text pages (PIL ImageDraw), some
  "scanned" (gray paper, noise, a slight rotation).
- ``screenshot``: UI-like images: window bars, buttons, panels, text, embedded pictures.
- ``noise``, ``gradient``: uniform/Gaussian/salt-and-pepper/smoothed noise; linear and radial ramps, flat images.
- ``medical_other``: other modalities: the Shepp-Logan CT head phantom (scaled, noisy), a
  synthetic axial chest CT slice, matplotlib's MRI head slice, a retina fundus photo, microscopy.

``hard_cases`` builds X-ray look-alikes reported separately (not in the target): a real X-ray
shown on a "screen" in a photo, an inverted X-ray, a rotated one.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

Item = tuple[str, str, bytes]  # (category, name, PNG/JPEG bytes)

_WORDS = " ".join(
    (
        "patient report radiology findings impression chest lungs clear no acute cardiopulmonary process",
        "history cough fever left lower lobe opacity consolidation recommend follow up signed",
        "date time invoice total amount due payment account number reference table summary",
        "results method",
    )
).split()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _pil(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype != np.uint8:
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4:
        return Image.fromarray(array, "RGBA")
    return Image.fromarray(array)


def _at_least(image: Image.Image, side: int = 224) -> Image.Image:
    scale = side / min(image.size)
    if scale <= 1:
        return image
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def _variants(category: str, name: str, image: Image.Image, rng: np.random.Generator) -> Iterator[Item]:
    """The picture, its grayscale (or mirrored) version and two random square-ish crops (upscaled to >= 224 px)."""
    image = _at_least(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    yield category, name, _jpeg(image)
    if image.mode == "L":  # already gray: a mirrored copy instead of a duplicate
        yield category, f"{name}-mirror", _png(ImageOps.mirror(image))
    else:
        yield category, f"{name}-gray", _png(image.convert("L"))
    for k in range(2):
        w, h = image.size
        side = int(min(w, h) * rng.uniform(0.5, 0.8))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        yield category, f"{name}-crop{k}", _jpeg(_at_least(image.crop((x, y, x + side, y + side))))


def _packaged() -> Iterator[tuple[str, str, Image.Image]]:
    """(category, name, image) for pictures shipped with scikit-image, scikit-learn and matplotlib."""
    import matplotlib.cbook
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    categories = {
        "photo": ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "clock", "colorwheel", "logo"),
        "texture": ("brick", "grass", "gravel", "coins", "moon", "hubble_deep_field", "checkerboard"),
        "document": ("page", "text"),
        "medical_other": ("retina", "cell", "immunohistochemistry", "microaneurysms", "shepp_logan_phantom"),
    }
    for category, names in categories.items():
        for name in names:
            yield category, name, _pil(getattr(sk, name)())
    for name, array in zip(("china", "flower"), load_sample_images().images):
        yield "photo", name, _pil(array)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = Image.open(handle).convert("RGB")
    yield "face", "grace_hopper", hopper
    yield "face", "astronaut_face", _pil(sk.astronaut()).crop((140, 20, 340, 220))
    with matplotlib.cbook.get_sample_data("s1045.ima.gz") as handle:  # 256x256 16-bit big-endian MRI slice
        raw = handle.read()  # matplotlib un-gzips it on the fly
        mri = np.frombuffer(raw if len(raw) == 2 * 256 * 256 else gzip.decompress(raw), ">u2").reshape(256, 256)
    yield "medical_other", "mri_head", _pil(mri.astype(np.float64))
    dem = matplotlib.cbook.get_sample_data("jacksboro_fault_dem.npz")  # matplotlib opens .npz itself
    yield "texture", "terrain_dem", _pil(np.asarray(dem["elevation"], dtype=np.float64))


def _faces(rng: np.random.Generator, count: int = 12) -> Iterator[Item]:
    path = Path(__import__("skimage.data", fromlist=["x"]).__file__).parent / "lfw_subset.npy"
    faces = np.load(path)  # (200, 25, 25) floats in [0, 1]
    for index in rng.choice(len(faces), count, replace=False):
        face = _pil(faces[index] * 255.0).resize((224, 224), Image.Resampling.BICUBIC)
        yield "face", f"lfw{index}", _png(face)


def _text_page(rng: np.random.Generator, scanned: bool, size: tuple[int, int]) -> Image.Image:
    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    font_size = int(rng.integers(12, 28))
    font = ImageFont.load_default(size=font_size)
    y = int(rng.integers(10, 40))
    draw.text((20, y), " ".join(rng.choice(_WORDS, 3)).upper(), fill=0, font=ImageFont.load_default(size=font_size + 8))
    y += font_size * 2 + 10
    while y < size[1] - font_size:
        if rng.random() < 0.1:  # a table rule
            draw.line((20, y, size[0] - 20, y), fill=0, width=2)
        draw.text((20, y), " ".join(rng.choice(_WORDS, int(rng.integers(4, 10)))), fill=0, font=font)
        y += int(font_size * 1.5)
    if scanned:
        paper = np.asarray(page, dtype=np.float64) * rng.uniform(0.75, 0.95) + rng.normal(0, 8, (size[1], size[0]))
        page = _pil(np.clip(paper, 0, 255).astype(np.uint8)).rotate(float(rng.uniform(-3, 3)), fillcolor=90)
    return page


def _screenshot(rng: np.random.Generator, inset: Image.Image | None) -> Image.Image:
    width, height = int(rng.integers(640, 1280)), int(rng.integers(400, 800))
    shot = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(shot)
    draw.rectangle((0, 0, width, 32), fill=tuple(int(v) for v in rng.integers(20, 90, 3)))
    draw.rectangle((0, 32, 180, height), fill=(235, 235, 240))
    font = ImageFont.load_default(size=14)
    for k in range(int(rng.integers(6, 14))):
        draw.text((12, 44 + 26 * k), " ".join(rng.choice(_WORDS, 2)), fill=(30, 30, 30), font=font)
    for k in range(int(rng.integers(2, 5))):  # buttons
        x = 200 + 110 * k
        draw.rounded_rectangle((x, 44, x + 100, 74), 6, fill=(40, 110, 220))
        draw.text((x + 14, 52), str(rng.choice(_WORDS)), fill=(255, 255, 255), font=font)
    if inset is not None:
        box = (200, 90, width - 20, height - 20)
        shot.paste(inset.convert("RGB").resize((box[2] - box[0], box[3] - box[1])), box[:2])
    else:
        for k in range(int(rng.integers(5, 15))):
            draw.text((200, 100 + 22 * k), " ".join(rng.choice(_WORDS, 8)), fill=(20, 20, 20), font=font)
    return shot


def _axial_ct(rng: np.random.Generator, size: int = 256) -> Image.Image:
    """A synthetic axial chest CT slice: body ellipse, two dark lungs, heart, spine, noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size))
    image[((x - 0.5) / 0.45) ** 2 + ((y - 0.5) / 0.33) ** 2 < 1] = 0.55
    for cx in (0.32, 0.68):
        image[((x - cx) / 0.14) ** 2 + ((y - 0.48) / 0.22) ** 2 < 1] = 0.05
    image[((x - 0.52) / 0.1) ** 2 + ((y - 0.5) / 0.09) ** 2 < 1] = 0.62
    image[((x - 0.5) / 0.05) ** 2 + ((y - 0.75) / 0.05) ** 2 < 1] = 1.0
    image += rng.normal(0, 0.03, image.shape)
    return _pil(np.clip(image, 0, 1) * 255.0)


def _synthetic(rng: np.random.Generator, photos: list[Image.Image]) -> Iterator[Item]:
    for k in range(12):
        size = (int(rng.integers(600, 1000)), int(rng.integers(700, 1100)))
        yield "document", f"rendered{k}", _png(_text_page(rng, scanned=k % 2 == 1, size=size))
    for k in range(10):
        inset = photos[k % len(photos)] if k % 2 else None
        yield "screenshot", f"ui{k}", _png(_screenshot(rng, inset))
    side = 256
    for k in range(4):
        yield "noise", f"uniform{k}", _png(_pil(rng.integers(0, 256, (side, side), dtype=np.uint8)))
        yield "noise", f"gaussian{k}", _png(_pil(np.clip(rng.normal(128, 40, (side, side)), 0, 255).astype(np.uint8)))
        smooth = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(2 + 3 * k)
        )
        yield "noise", f"smooth{k}", _png(ImageOps.autocontrast(smooth))
        salt = np.where(rng.random((side, side)) < 0.5, 0, 255).astype(np.uint8)
        yield "noise", f"saltpepper{k}", _png(_pil(salt))
        yield "noise", f"color{k}", _png(_pil(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
    y, x = np.mgrid[0:side, 0:side] / side
    ramps = {"linear_h": x, "linear_v": y, "diagonal": (x + y) / 2, "radial": np.hypot(x - 0.5, y - 0.5)}
    for name, ramp in ramps.items():
        yield "gradient", name, _png(_pil(ramp * 255.0))
        yield "gradient", f"{name}-inv", _png(_pil(255.0 - ramp * 255.0))
    for value in (0, 128, 255):
        yield "gradient", f"flat{value}", _png(Image.new("L", (side, side), value))
    yield "gradient", "flat_red", _png(Image.new("RGB", (side, side), (200, 30, 30)))
    import skimage.data as sk

    phantom = sk.shepp_logan_phantom()
    for k in range(4):
        noisy = phantom + rng.normal(0, 0.02 * (k + 1), phantom.shape)
        yield "medical_other", f"phantom_noisy{k}", _png(_pil(np.clip(noisy, 0, 1) * 255.0).rotate(15.0 * k))
    for k in range(4):
        yield "medical_other", f"axial_ct{k}", _png(_axial_ct(rng))


def build_nonxray_set(seed: int = 0) -> list[Item]:
    """Every image of the set as ``(category, name, encoded bytes)``; the same for the same seed."""
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    photos: list[Image.Image] = []
    for category, name, image in _packaged():
        items.extend(_variants(category, name, image, rng))
        if category == "photo":
            photos.append(image)
    items.extend(_faces(rng))
    items.extend(_synthetic(rng, photos))
    return items


def hard_cases(xrays: list[Path], seed: int = 0) -> list[Item]:
    """X-ray look-alikes (reported apart from the target): on a screen in a photo, inverted, rotated 90 degrees."""
    rng = np.random.default_rng(seed)
    items: list[Item] = []
    makers: dict[str, Callable[[Image.Image], Image.Image]] = {
        "on_screen": lambda xray: _on_screen(xray, rng),
        "inverted": ImageOps.invert,
        "rotated90": lambda xray: xray.rotate(90, expand=True),
    }
    for path in xrays:
        xray = Image.open(path).convert("L")
        for kind, make in makers.items():
            items.append((f"hard_{kind}", f"{path.stem}-{kind}", _jpeg(make(xray))))
    return items


def _on_screen(xray: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The X-ray on a monitor in a room: dark bezel, bluish cast, a warped quad, glare and sensor noise."""
    room = Image.new("RGB", (800, 600), tuple(int(v) for v in rng.integers(90, 170, 3)))
    screen = ImageOps.colorize(xray.resize((420, 420)), black=(10, 12, 25), white=(210, 225, 255))
    bezel = Image.new("RGB", (460, 460), (15, 15, 15))
    bezel.paste(screen, (20, 20))
    skew = rng.uniform(-0.08, 0.08)
    bezel = bezel.transform(
        bezel.size, Image.Transform.AFFINE, (1, skew, -skew * 230, 0, 1, 0), fillcolor=(120, 110, 100)
    )
    room.paste(bezel, (170, 70))
    photo = np.asarray(room, dtype=np.float64) + rng.normal(0, 6, (600, 800, 3))
    return _pil(np.clip(photo, 0, 255).astype(np.uint8))
