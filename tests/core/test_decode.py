"""Validation of every class of bad input, and correct decoding of every odd-but-valid one (pneumo.core.decode)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import (
    BAD_INPUTS,
    BadInput,
    encode,
    exif_rotated_jpeg,
    png_with_size,
    set_png_size,
    xray_like,
)
from conftest import run_with_helpers
from PIL import Image

from pneumo.core.decode import DEFAULT_LIMITS, Limits, read_image, sniff_format
from pneumo.core.errors import InputTooLargeError, InvalidImageError, PneumoError, UnsupportedFormatError

# pydicom warns about the malformed UID of one bad input; expected, and not what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")

# ----------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_bad_input_is_refused_with_its_code(bad: BadInput) -> None:
    with pytest.raises(bad.error) as caught:
        read_image(bad.make())
    assert caught.value.code == bad.code
    assert " at 0x" not in caught.value.message  # no object reprs leak into user-facing messages


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.name)
def test_bad_input_from_a_file_gives_the_same_code(bad: BadInput, tmp_path: Path) -> None:
    path = tmp_path / "upload.jpeg"  # the extension says JPEG; only the bytes count
    path.write_bytes(bad.make())
    with pytest.raises(PneumoError) as caught:
        read_image(path)
    assert caught.value.code == bad.code


def test_http_statuses_follow_the_error_class() -> None:
    assert UnsupportedFormatError("x").http_status == 415
    assert InputTooLargeError("x").http_status == 413
    assert InvalidImageError("x").http_status == 400


def test_missing_path_and_directory(tmp_path: Path) -> None:
    for source in (tmp_path / "nope.png", tmp_path, str(tmp_path / "nope.png")):
        with pytest.raises(InvalidImageError) as caught:
            read_image(source)
        assert caught.value.code == "file_not_found"


def test_unreadable_file_is_a_typed_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.png"
    path.write_bytes(encode(xray_like(), "PNG"))

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # works as root too, unlike chmod 000
    with pytest.raises(InvalidImageError) as caught:
        read_image(path)
    assert caught.value.code == "unreadable_file"
    assert "Permission denied" in caught.value.message


def test_file_over_the_byte_limit_is_refused_before_reading(tmp_path: Path) -> None:
    data = encode(xray_like((256, 256)), "PNG")
    limits = Limits(max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(InputTooLargeError) as caught:
            read_image(source, limits)
        assert caught.value.code == "file_too_large"
    read_image(data, Limits(max_bytes=len(data)))  # exactly at the limit is fine


def test_pixel_cap_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another library disabling Pillow's bomb check must not disable pneumo's."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputTooLargeError) as caught:
        read_image(png_with_size(7000, 7000))
    assert caught.value.code == "too_many_pixels"
    data = encode(xray_like((120, 100)), "PNG")
    with pytest.raises(InputTooLargeError):
        read_image(data, Limits(max_pixels=120 * 100 - 1))
    assert read_image(data, Limits(max_pixels=120 * 100)).image.size == (120, 100)


def test_lying_size_header_is_caught() -> None:
    """A header that claims more pixels than the data hold is refused, never padded silently."""
    data = set_png_size(encode(xray_like(), "PNG"), 2000, 2000)
    with pytest.raises(InvalidImageError) as caught:
        read_image(data)
    assert caught.value.code in ("truncated_image", "corrupt_image")


def test_decompression_bombs_keep_memory_flat() -> None:
    """In a child whose address space may grow by 64 MB only, bombs are refused, not decoded.

    Pillow's own bomb check is switched off there (as some libraries do), so only pneumo's cap
    stands between a 81-megapixel PNG of 80 KB and an 81 MB allocation; a 4 MP image still decodes.
    """
    script = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from PIL import Image
        from bad_inputs import png_with_size, set_jpeg_size, encode, xray_like
        from pneumo.core.errors import InputTooLargeError
        from pneumo.core.decode import read_image
        Image.MAX_IMAGE_PIXELS = None
        bombs = [png_with_size(9000, 9000, real_pixels=True), png_with_size(100_000, 100_000),
                 set_jpeg_size(encode(xray_like(), "JPEG"), 65000, 65000)]
        fine = encode(xray_like((2000, 2000)), "PNG")
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        codes = []
        for data in bombs:
            try:
                read_image(data)
            except InputTooLargeError as err:
                codes.append(err.code)
        codes.append(str(read_image(fine).image.size))
        print(",".join(codes))
        """
    )
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to measure the address space")
    done = run_with_helpers(script, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "too_many_pixels,too_many_pixels,too_many_pixels,(2000, 2000)"


# --------------------------------------------------------------------------- odd but valid inputs


def test_format_is_sniffed_from_bytes_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "scan.jpg"  # really a PNG
    path.write_bytes(encode(xray_like(), "PNG"))
    decoded = read_image(path)
    assert decoded.format == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"GIF89a") == "gif"  # named, so its refusal can say what it is
    assert sniff_format(b"%PDF-1.7") is None


def test_accepts_bytes_like_inputs() -> None:
    data = encode(xray_like(), "PNG")
    for source in (data, bytearray(data), memoryview(data)):
        assert read_image(source).image.size == (96, 96)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_single_frame_formats_decode_to_gray8(fmt: str) -> None:
    source = xray_like((100, 80))
    options: dict[str, object] = {"JPEG": {"quality": 98}}.get(fmt, {})
    decoded = read_image(encode(source, fmt, **options))
    assert decoded.image.mode == "L"
    assert decoded.image.size == (100, 80) == decoded.original_size
    diff = np.abs(np.asarray(decoded.image, dtype=int) - np.asarray(source, dtype=int))
    assert diff.max() <= (8 if fmt == "JPEG" else 0)


@pytest.mark.parametrize(("fmt", "name"), [("WEBP", "WebP"), ("BMP", "BMP"), ("GIF", "GIF")])
def test_formats_without_clinical_use_are_refused_by_name(fmt: str, name: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=f"is a {name} image") as caught:
        read_image(encode(xray_like(), fmt))
    assert caught.value.code == "unsupported_format" and caught.value.http_status == 415
    assert "PNG, JPEG or DICOM" in caught.value.message


def test_limits_boundaries_are_inclusive() -> None:
    assert read_image(encode(xray_like((64, 64)), "PNG")).image.size == (64, 64)
    assert read_image(encode(xray_like((256, 64)), "PNG")).image.size == (256, 64)  # exactly 4:1
    with pytest.raises(InvalidImageError, match="at least 64"):
        read_image(encode(xray_like((63, 200)), "PNG"))


def test_16_bit_png_keeps_its_contrast() -> None:
    """12 significant bits in a 16-bit PNG (common for radiographs) must not come out black."""
    base = np.asarray(xray_like(), dtype=np.float64)
    twelve_bit = np.round((base - base.min()) / (base.max() - base.min()) * 4095).astype(np.uint16)
    decoded = read_image(encode(Image.fromarray(twelve_bit), "PNG"))
    pixels = np.asarray(decoded.image, dtype=np.float64)
    assert decoded.image.mode == "L"
    assert pixels.min() == 0 and pixels.max() == 255
    expected = twelve_bit / 4095 * 255
    assert np.abs(pixels - expected).max() <= 1


def test_16_bit_copy_of_a_full_range_8_bit_image_decodes_to_it() -> None:
    source = np.asarray(xray_like(), dtype=np.uint16)
    source = ((source - source.min()) * 255 // (source.max() - source.min())).astype(np.uint16)
    decoded = read_image(encode(Image.fromarray(source * 257), "PNG"))
    assert np.abs(np.asarray(decoded.image, dtype=int) - source.astype(int)).max() <= 1


def test_float_and_32_bit_tiffs_are_windowed_and_finite() -> None:
    values = np.asarray(xray_like(), dtype=np.float32) * 10.0 - 500.0
    values[0, :5] = np.nan
    decoded = read_image(encode(Image.fromarray(values, mode="F"), "TIFF"))
    pixels = np.asarray(decoded.image)
    assert pixels.dtype == np.uint8 and pixels.max() == 255
    decoded32 = read_image(encode(Image.fromarray(np.asarray(xray_like(), dtype=np.int32) * 1000), "TIFF"))
    assert np.asarray(decoded32.image).max() == 255


def test_palette_png_matches_its_grayscale() -> None:
    rgb = Image.merge("RGB", [xray_like(seed=s) for s in (1, 2, 3)])
    palette = rgb.quantize(64)
    decoded = read_image(encode(palette, "PNG"))
    assert np.array_equal(np.asarray(decoded.image), np.asarray(palette.convert("L")))


def test_rgba_transparent_areas_become_black_opaque_areas_keep_their_gray() -> None:
    gray = xray_like()
    alpha = Image.new("L", gray.size, 255)
    alpha.paste(0, (0, 0, 48, 96))  # left half transparent
    rgba = Image.merge("RGBA", [gray, gray, gray, alpha])
    for image in (rgba, rgba.convert("LA")):
        pixels = np.asarray(read_image(encode(image, "PNG")).image, dtype=int)
        assert (pixels[:, :48] == 0).all()
        assert np.abs(pixels[:, 48:] - np.asarray(gray, dtype=int)[:, 48:]).max() <= 1


def test_rgb_and_cmyk_jpegs_become_luminance() -> None:
    gray = xray_like()
    rgb = Image.merge("RGB", [gray, gray, gray])
    for image in (rgb, rgb.convert("CMYK")):
        pixels = np.asarray(read_image(encode(image, "JPEG", quality=95)).image, dtype=int)
        assert np.abs(pixels - np.asarray(gray, dtype=int)).mean() < 4


@pytest.mark.parametrize(
    ("orientation", "transpose"),
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_applied(orientation: int, transpose: Image.Transpose) -> None:
    data, stored = exif_rotated_jpeg(orientation)
    decoded = read_image(data)
    expected = np.asarray(stored.transpose(transpose), dtype=int)
    assert decoded.image.size == (expected.shape[1], expected.shape[0])
    assert np.abs(np.asarray(decoded.image, dtype=int) - expected).mean() < 3  # the marker moved with it


def test_camera_mpo_jpeg_uses_its_first_frame() -> None:
    """Phone cameras write MPO (the photo plus previews); that is one picture, not a multi-frame upload."""
    first, second = xray_like(seed=1).convert("RGB"), xray_like(seed=2).convert("RGB")
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    decoded = read_image(data)
    assert decoded.format == "jpeg"
    assert np.abs(np.asarray(decoded.image, dtype=int) - np.asarray(first.convert("L"), dtype=int)).mean() < 3


def test_bilevel_image_decodes() -> None:
    decoded = read_image(encode(xray_like().convert("1"), "PNG"))
    assert set(np.unique(np.asarray(decoded.image)).tolist()) <= {0, 255}


def test_draft_decoding_shrinks_big_jpegs_but_not_below_the_model_size() -> None:
    data = encode(xray_like((1200, 1000)), "JPEG")
    decoded = read_image(data, draft_size=224)
    assert decoded.original_size == (1200, 1000)
    assert 224 <= min(decoded.image.size) < 1000
    assert read_image(data).image.size == (1200, 1000)


def test_default_limits_are_documented_values() -> None:
    """The README and docs/reliability.md quote these numbers; change them together."""
    documented = Limits(
        max_bytes=64 * 2**20,
        max_pixels=36_000_000,
        min_side=64,
        max_aspect_ratio=4.0,
        max_scans=32,
        max_elements=50_000,
        max_codeblocks=150_000,
        max_tiles=4096,
        decode_cpu_seconds=2.0,
        decode_wall_seconds=30.0,
    )
    assert documented == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_pixels >= 4300 * 4300 and DEFAULT_LIMITS.max_bytes >= 60 * 10**6  # issue 21


def test_real_fullres_films_decode(shared_data: Path) -> None:
    files = sorted((shared_data / "fullres_samples").rglob("*.jpeg"))
    assert files
    for path in files:
        decoded = read_image(path, draft_size=224)
        assert decoded.image.mode == "L" and min(decoded.image.size) >= 224
