"""The ONNX Runtime backend of :class:`~pneumo.serving.inference.Predictor`, and where ONNX files live.

Why ONNX Runtime: on a clinic laptop without a GPU, the same EfficientNet-Lite0 graph runs several
times faster under ONNX Runtime (fused convolutions, no Python dispatch per layer) than in eager
PyTorch. The exported graph (see :mod:`pneumo.modeling.export`) has one input ``input``
(N, 3, S, S) with a dynamic batch axis and two outputs, ``logits`` (N, C) and ``features`` (N, F),
exactly what :meth:`Predictor.forward` returns (the pooled features feed the out-of-distribution
gate), so the two backends are interchangeable.

Where the ONNX file lives: a bundle may hold ``model.onnx`` next to its weights
(``pneumo export onnx --model BUNDLE``). The default bundle does *not* ship one: its weights are
13.7 MB and the ONNX graph is as large again, over the package's 25 MB budget. Instead, the first
:class:`Predictor` that wants ONNX exports the graph once into a per-user cache
(``$PNEUMO_CACHE/onnx``, else ``$XDG_CACHE_HOME/pneumo/onnx``, else ``~/.cache/pneumo/onnx``),
named by the SHA-256 of the weights, and every later start reuses it.

Every exported file records the SHA-256 of the weights it was made from; a ``model.onnx`` whose
weights have since changed (a bundle retrained in place) is ignored with a warning, so the ONNX
backend can never answer with stale weights.

No torch here: running an existing export needs only onnxruntime; exporting (first use of a
bundle without an export) imports the training stack lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from pneumo.core.bundle import WEIGHTS_FILE, resolve_bundle
from pneumo.core.environment import available_cores
from pneumo.core.errors import PneumoError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAMES = ("logits", "features")
BACKENDS = ("auto", "torch", "onnx")
#: Metadata key (in the ONNX model's ``metadata_props``) holding the SHA-256 of the source weights.
WEIGHTS_SHA_KEY = "pneumo_weights_sha256"
#: Cached exports kept (most recently used first); older ones are deleted after each new export.
CACHE_KEEP = 8


class OnnxBackendError(PneumoError):
    """The ONNX backend was asked for and cannot be used (no onnxruntime, export failed, bad file)."""

    code = "onnx_unavailable"
    http_status = 500


# ------------------------------------------------------------------------------------------ files


def weights_sha256(bundle_dir: str | Path) -> str:
    """SHA-256 of the bundle's weights: names the cached export and detects stale ``model.onnx`` files."""
    digest = hashlib.sha256()
    with (Path(bundle_dir) / WEIGHTS_FILE).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Folder of cached exports: ``$PNEUMO_CACHE/onnx``, ``$XDG_CACHE_HOME/pneumo/onnx`` or ``~/.cache/pneumo/onnx``."""
    if os.environ.get("PNEUMO_CACHE"):
        return Path(os.environ["PNEUMO_CACHE"]).expanduser() / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pneumo" / "onnx"


def cached_onnx_path(bundle_dir: str | Path, sha: str | None = None) -> Path:
    """Where the cached export of ``bundle_dir``'s weights lives (whether or not it exists yet)."""
    return cache_dir() / f"{sha or weights_sha256(bundle_dir)}.onnx"


def onnx_weights_sha(path: str | Path) -> str | None:
    """The weights hash recorded in an exported file, or None (not ours, or unreadable)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged or foreign file: treated as absent
        return None
    return next((p.value for p in model.metadata_props if p.key == WEIGHTS_SHA_KEY), None)


def find_onnx(bundle_dir: str | Path) -> Path | None:
    """An up-to-date ONNX export of the bundle: its own ``model.onnx``, else the cached export, else None."""
    folder = resolve_bundle(bundle_dir)
    sha = weights_sha256(folder)
    own = folder / ONNX_FILE
    if own.is_file():
        if onnx_weights_sha(own) == sha:
            return own
        log.warning(
            "%s was not exported from this bundle's weights (retrained since?); ignoring it. "
            "Run `pneumo export onnx --model %s` to refresh it.",
            own,
            folder,
        )
    cached = cached_onnx_path(folder, sha)
    if cached.is_file() and onnx_weights_sha(cached) == sha:
        with contextlib.suppress(OSError):
            os.utime(cached)  # mark as recently used, for prune_cache
        return cached
    return None


def prune_cache(keep: int = CACHE_KEEP) -> list[Path]:
    """Delete all but the ``keep`` most recently used cached exports; returns the deleted files.

    Every retrained bundle adds one file (~14 MB for Lite0); without pruning the cache would grow forever.
    """
    files = sorted(cache_dir().glob("*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    removed = []
    for old in files[keep:]:
        with contextlib.suppress(OSError):  # another process may be pruning too
            old.unlink()
            removed.append(old)
    return removed


# ---------------------------------------------------------------------------------------- runtime


class OnnxRunner:
    """An ONNX Runtime CPU session with :meth:`Predictor.forward`'s contract: batch -> (logits, features).

    Session settings: one intra-op thread per available core (the model is the only heavy work
    during a prediction), one inter-op thread (the graph is a chain: nothing runs in parallel
    between nodes), all graph optimizations (Conv+BN+activation fusion, constant folding), and
    no spin-waiting: by default ONNX Runtime's worker threads keep spinning after each run, which
    on a 2-core machine takes the core the next image's decoding needs, and on a busy machine
    starves everything else. Measured with the default model on 2 loaded cores: single-image
    latency 61 ms without spinning vs 140 ms with it, at half the CPU time per image.
    ``run`` is thread-safe, so one runner serves every request of the API.

    Args:
        path: the exported ``.onnx`` file.
        threads: intra-op threads; default: :func:`available_cores`.
        spin: let idle worker threads spin-wait (lowest latency on an otherwise idle machine only).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, spin: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise OnnxBackendError("The ONNX backend needs onnxruntime: pip install onnxruntime.") from err
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise OnnxBackendError(f"ONNX Runtime cannot load {self.path}: {err}", code="onnx_load_failed") from err
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [INPUT_NAME] or outputs != list(OUTPUT_NAMES):
            raise OnnxBackendError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                f"{list(OUTPUT_NAMES)}. Export it with `pneumo export onnx`.",
                code="onnx_load_failed",
            )

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and pooled features (N, F) of a preprocessed float32 batch (N, 3, S, S)."""
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})
        return logits, features


def select_onnx_runner(bundle_dir: str | Path, backend: str = "auto", *, device: str = "cpu") -> OnnxRunner | None:
    """Resolve the Predictor's ``backend`` choice: an :class:`OnnxRunner`, or None for PyTorch.

    ``"torch"`` always gives None. ``"onnx"`` gives a runner or raises. ``"auto"`` gives a runner
    when the model runs on the CPU and onnxruntime imports, exporting the bundle into the user
    cache the first time when it has no ``model.onnx``; if anything fails it logs a warning and
    returns None (PyTorch), so a prediction never fails because the fast path did. Under
    ``"auto"``, the environment variable ``PNEUMO_BACKEND`` (``torch`` or ``onnx``) overrides
    the choice, e.g. to keep a test suite or a read-only container on PyTorch.

    Raises:
        OnnxBackendError: ``backend`` is unknown, or ``"onnx"`` was asked for and is impossible.
    """
    if backend not in BACKENDS:
        raise OnnxBackendError(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)}.", code="bad_backend")
    if backend == "auto":
        override = os.environ.get("PNEUMO_BACKEND", "").strip().lower()
        if override and override != "auto":
            if override not in BACKENDS:
                raise OnnxBackendError(
                    f"PNEUMO_BACKEND={override!r} is not a backend; use one of {', '.join(BACKENDS)}.",
                    code="bad_backend",
                )
            return select_onnx_runner(bundle_dir, override, device=device)
    if backend == "torch":
        return None
    if device.split(":")[0] != "cpu":
        if backend == "onnx":
            raise OnnxBackendError(
                f"The ONNX backend runs on the CPU, but device={device!r} was asked for; "
                "use device='cpu' or backend='torch'.",
                code="bad_backend",
            )
        return None  # a GPU is faster in PyTorch than the CPU in ONNX Runtime
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        if backend == "onnx":
            raise OnnxBackendError("backend='onnx' needs onnxruntime: pip install onnxruntime.") from err
        log.info("onnxruntime is not installed; using PyTorch.")
        return None
    try:
        path = find_onnx(bundle_dir)
        if path is None:
            log.info("No ONNX export of %s yet; exporting it once into %s.", bundle_dir, cache_dir())
            from pneumo.modeling.export import export_onnx  # lazy: exporting needs torch

            path = export_onnx(bundle_dir, out=cached_onnx_path(bundle_dir))
            prune_cache()
        return OnnxRunner(path)
    except Exception as err:
        if backend == "onnx":
            if isinstance(err, OnnxBackendError):
                raise
            raise OnnxBackendError(f"The ONNX backend is unavailable: {type(err).__name__}: {err}") from err
        log.warning("ONNX Runtime unavailable for %s (%s); falling back to PyTorch.", bundle_dir, err)
        return None
