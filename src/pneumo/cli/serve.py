"""``pneumo app`` (the clinician's Streamlit page) and ``pneumo serve`` (the HTTP API)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import ModelOption, fail, require_extra


def app_command(
    port: Annotated[int, typer.Option(help="Port of the web page.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    model: ModelOption = None,
) -> None:
    """Start the clinician's web page (Streamlit) at http://HOST:PORT."""
    require_extra("app", "app")  # the base install is the serving node: one line, not an ImportError
    from streamlit.web import cli as streamlit_cli

    from pneumo.core.bundle import resolve_bundle
    from pneumo.core.decode import DEFAULT_LIMITS
    from pneumo.core.errors import PneumoError

    try:
        bundle = resolve_bundle(model).resolve() if model is not None else None
    except PneumoError as err:
        fail(err.message)
    page = Path(__file__).parents[1] / "app" / "page.py"
    args = ["run", str(page), "--server.port", str(port), "--server.address", host, "--server.headless", "true"]
    args += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    args += ["--client.showErrorDetails", "none"]  # a traceback never reaches the page, even on a bug
    args += ["--server.maxUploadSize", str(max(1, round(DEFAULT_LIMITS.max_bytes / 2**20)))]
    if bundle is not None:
        args += ["--", "--model", str(bundle)]
    typer.echo(f"pneumo app: http://{host}:{port}", err=True)
    streamlit_cli.main(args=args, prog_name="streamlit")


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    model: ModelOption = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest file accepted, in MB (413 above it).")] = 20.0,
    max_batch_files: Annotated[int, typer.Option(help="Most files in one /v1/predict/batch request.")] = 16,
    max_concurrent: Annotated[
        int | None, typer.Option(help="Requests analysed at once; default: one per core, fewer if memory is short.")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests waiting beyond those (503 server_busy above); default 8x.")
    ] = None,
) -> None:
    """Start the HTTP API (FastAPI + uvicorn); OpenAPI docs at http://HOST:PORT/docs."""
    import dataclasses

    import uvicorn

    from pneumo.api.routes import create_app
    from pneumo.core.decode import DEFAULT_LIMITS
    from pneumo.core.errors import PneumoError

    if max_upload_mb <= 0 or max_batch_files < 1 or (max_concurrent or 1) < 1 or (max_queue or 0) < 0:
        fail("--max-upload-mb must be positive, --max-batch-files and --max-concurrent at least 1, --max-queue >= 0.")
    limits = dataclasses.replace(DEFAULT_LIMITS, max_bytes=int(max_upload_mb * 2**20))
    try:
        api = create_app(
            model, limits, max_batch_files=max_batch_files, max_concurrent=max_concurrent, max_queue=max_queue
        )
    except PneumoError as err:
        fail(err.message)
    uvicorn.run(api, host=host, port=port)
