"""The HTTP API (FastAPI): the inference engine behind ``/v1/predict``, limits, backpressure and error bodies."""

from pneumo.api.routes import create_app

__all__ = ["create_app"]
