"""The inference engine: a model bundle in, answers out, with no torch (ONNX Runtime, or OpenVINO where installed).

:class:`Predictor` is the one path from a file or upload to a calibrated answer; the API, the app,
the DICOM node, the CLI and the evaluation all use it. Heatmaps come from the same graph
(:func:`make_explainer`), the not-a-chest-X-ray gate from the bundle's statistics (:class:`OodGate`).
"""

from pneumo.core.bundle import Backend
from pneumo.inference.cam import OnnxCamExplainer, make_explainer
from pneumo.inference.explain import Explainer, ExplainUnavailableError, Explanation
from pneumo.inference.files import Source, iter_image_files
from pneumo.inference.ood import OodGate
from pneumo.inference.openvino import OpenVinoRunner
from pneumo.inference.predictor import Prediction, Predictor
from pneumo.inference.runners import BackendError, OnnxRunner, Runner, register_backend

__all__ = [
    "Backend",
    "BackendError",
    "ExplainUnavailableError",
    "Explainer",
    "Explanation",
    "OnnxCamExplainer",
    "OnnxRunner",
    "OodGate",
    "OpenVinoRunner",
    "Prediction",
    "Predictor",
    "Runner",
    "Source",
    "iter_image_files",
    "make_explainer",
    "register_backend",
]
