"""The exceptions pneumo raises, each with a stable machine-readable ``code``.

Every user-facing layer maps these the same way: the CLI writes ``{"code", "message"}`` in a
batch row, the API answers a 4xx JSON body ``{"error": {"code", "message"}}``, the app shows
the message. Codes are part of the public contract: never rename one, add new ones instead.
"""

from __future__ import annotations


class PneumoError(Exception):
    """Base class of every error pneumo raises on purpose.

    Args:
        message: what was received, what was expected and what to do about it.
        code: stable identifier; defaults to the class's ``code``.
    """

    code = "pneumo_error"
    #: HTTP status the API answers with for this error.
    http_status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """The ``{"code", "message"}`` pair shared by the CLI's JSON rows and the API's error body."""
        return {"code": self.code, "message": self.message}


class InvalidImageError(PneumoError):
    """The input cannot be turned into an image the model may see (see ``pneumo.core.decode``)."""

    code = "invalid_image"
    http_status = 400


class UnsupportedFormatError(InvalidImageError):
    """The bytes are not a format pneumo reads (JPEG, PNG, DICOM; a few others through Pillow)."""

    code = "unsupported_format"
    http_status = 415


class InputTooLargeError(InvalidImageError):
    """The file or its decoded pixel count is over the configured limit."""

    code = "too_large"
    http_status = 413


class DicomError(InvalidImageError):
    """A DICOM file that is valid DICOM but not usable (no pixels, RGB, wrong modality, codec)."""

    code = "invalid_dicom"
    http_status = 422


class DecodeAbortedError(InvalidImageError):
    """Decoding was stopped: it ran past its CPU or wall-clock deadline (``decode_timeout``), or the
    isolated decoder died on the input (``decoder_crashed``). The file is damaged or built to stall."""

    code = "decode_timeout"
    http_status = 422


class NotAChestXrayError(PneumoError):
    """The image decoded fine but does not look like a frontal chest X-ray (``pneumo.inference.ood``)."""

    code = "not_a_chest_xray"
    http_status = 422


class ServerBusyError(PneumoError):
    """The API is analysing as many requests as it may at once and its queue is full: retry later.

    Args:
        retry_after: seconds after which a retry is likely to be admitted (the ``Retry-After`` header).
    """

    code = "server_busy"
    http_status = 503

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BundleError(PneumoError):
    """A model bundle is missing, incomplete or inconsistent with its weights."""

    code = "bundle_error"
    http_status = 500


class PretrainedWeightsUnavailableError(PneumoError):
    """Pretrained weights were asked for and could not be found offline or on the hub."""

    code = "pretrained_weights_unavailable"


class DataError(PneumoError):
    """A dataset folder does not have the expected layout or has no usable images."""

    code = "data_error"
