"""The ground floor: errors, decoding, the one preprocessing path and the bundle contract (no torch, no model).

Every other package builds on these; they import nothing of pneumo's but each other.
"""

from pneumo.core.bundle import Backend, BundleMeta, ThresholdRule, decide, read_meta, resolve_bundle
from pneumo.core.decode import DEFAULT_LIMITS, DecodedImage, Limits, read_image
from pneumo.core.errors import (
    BundleError,
    DataError,
    DicomError,
    InputTooLargeError,
    InvalidImageError,
    NotAChestXrayError,
    PneumoError,
    ServerBusyError,
    UnsupportedFormatError,
)
from pneumo.core.preprocess import PreprocessConfig

__all__ = [
    "DEFAULT_LIMITS",
    "Backend",
    "BundleError",
    "BundleMeta",
    "DataError",
    "DecodedImage",
    "DicomError",
    "InputTooLargeError",
    "InvalidImageError",
    "Limits",
    "NotAChestXrayError",
    "PneumoError",
    "PreprocessConfig",
    "ServerBusyError",
    "ThresholdRule",
    "UnsupportedFormatError",
    "decide",
    "read_image",
    "read_meta",
    "resolve_bundle",
]
