"""``pneumo app`` (the clinician's Streamlit page), ``pneumo serve`` (the HTTP API) and ``pneumo serve keys``."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from pathlib import Path
from typing import Annotated

import typer

from pneumo.cli.common import ModelOption, fail, require_extra

page_app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="Start the clinician's web page (Streamlit). `password FILE`: set the page's password.",
)


@page_app.callback()
def app_command(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port of the web page.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    model: ModelOption = None,
    password_file: Annotated[
        Path | None, typer.Option(help="Ask for the password stored in this file (`pneumo app password FILE`).")
    ] = None,
    auth_header: Annotated[
        str | None,
        typer.Option(help="Serve only requests carrying this header, set by a signing-in reverse proxy."),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Serve a non-loopback address WITHOUT any sign-in.")
    ] = False,
    max_files: Annotated[int, typer.Option(help="Files one browser session may have analysed at once.")] = 50,
    max_mb: Annotated[float, typer.Option(help="Megabytes of uploads one browser session may hold at once.")] = 200.0,
) -> None:
    """Start the clinician's web page (Streamlit) at http://HOST:PORT."""
    if ctx.invoked_subcommand is not None:
        return
    require_extra("app", "app")  # the base install is the serving node: one line, not an ImportError
    import os

    from streamlit.web import cli as streamlit_cli

    from pneumo.app.auth import AUTH_HEADER_ENV, PASSWORD_FILE_ENV, AppAuthError, auth_from_env
    from pneumo.app.support import BUDGET_FILES_ENV, BUDGET_MB_ENV
    from pneumo.core.bundle import resolve_bundle
    from pneumo.core.decode import DEFAULT_LIMITS
    from pneumo.core.errors import PneumoError

    if max_files < 1 or max_mb <= 0:
        fail("--max-files must be at least 1 and --max-mb positive.")
    if password_file is None and auth_header is None and not is_loopback(host) and not insecure_no_auth:
        fail(
            f"refusing to serve the page on {host} without a sign-in. Set a password (pneumo app password FILE, then "
            "--password-file FILE), or put a signing-in proxy in front (--auth-header X-Forwarded-User, page on "
            "127.0.0.1), or pass --insecure-no-auth."
        )
    environ = {BUDGET_FILES_ENV: str(max_files), BUDGET_MB_ENV: str(max_mb)}
    if password_file is not None:
        environ[PASSWORD_FILE_ENV] = str(password_file.resolve())
    if auth_header is not None:
        environ[AUTH_HEADER_ENV] = auth_header
    try:
        auth_from_env(environ)  # a bad password file or header name is one line here, not a broken page
        bundle = resolve_bundle(model).resolve() if model is not None else None
    except (PneumoError, AppAuthError) as err:
        fail(err.message)
    os.environ.update(environ)  # the page runs in this process and reads them
    page = Path(__file__).parents[1] / "app" / "page.py"
    args = ["run", str(page), "--server.port", str(port), "--server.address", host, "--server.headless", "true"]
    args += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]
    args += ["--client.showErrorDetails", "none"]  # a traceback never reaches the page, even on a bug
    args += ["--server.maxUploadSize", str(max(1, round(DEFAULT_LIMITS.max_bytes / 2**20)))]
    args += ["--server.disconnectedSessionTTL", "60"]  # a closed tab's uploads are freed after a minute
    if bundle is not None:
        args += ["--", "--model", str(bundle)]
    typer.echo(f"pneumo app: http://{host}:{port}", err=True)
    streamlit_cli.main(args=args, prog_name="streamlit")


@page_app.command("password")
def app_password(
    file: Annotated[Path, typer.Argument(help="Where to store the password's hash (mode 0600).")],
) -> None:
    """Set the page's password (asked twice; read from standard input when it is not a terminal)."""
    import sys

    from pneumo.app.auth import AppAuthError, write_password_file

    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        write_password_file(file, password)
    except AppAuthError as err:
        fail(err.message)
    typer.echo(f"Password hash written to {file}; start the page with --password-file {file}.", err=True)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The ``Host`` names a server bound to ``host`` answers when no ``--allowed-host`` is given.

    Loopback: the loopback names only (a web page that rebinds its DNS name to 127.0.0.1 gets
    nothing). Another address: that address, this machine's names and the addresses they resolve
    to, and the loopback names.
    """
    from pneumo.api.security import LOOPBACK_HOSTS

    if is_loopback(host):
        return LOOPBACK_HOSTS
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host.strip("[]"))
    return (*LOOPBACK_HOSTS, *sorted(name.lower() for name in names if name))


serve_app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="Start the HTTP API (FastAPI + uvicorn); OpenAPI docs at http://HOST:PORT/docs. `keys`: manage API keys.",
)


@serve_app.callback()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    model: ModelOption = None,
    api_keys: Annotated[
        Path | None, typer.Option("--api-keys", help="API key file (`pneumo serve keys add`); required off loopback.")
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="Serve a non-loopback address WITHOUT authentication.")
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(help="Host name clients use (repeatable; '*.example.org'; '*' for any). Default: see docs."),
    ] = None,
    cors_origin: Annotated[
        list[str] | None, typer.Option(help="Web origin allowed to call the API from a browser (repeatable).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Server processes (each loads the model); about one per 2 cores.")] = 1,
    max_upload_mb: Annotated[
        float | None, typer.Option(help="Largest file accepted, in MB (413 above it); default: the decoder's 64 MB.")
    ] = None,
    max_batch_files: Annotated[int, typer.Option(help="Most files in one /v1/predict/batch request.")] = 16,
    max_concurrent: Annotated[
        int | None,
        typer.Option(help="Requests analysed at once per process; default: its share of the cores."),
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="Requests waiting beyond those (503 server_busy above); default 4x.")
    ] = None,
    request_timeout: Annotated[float, typer.Option(help="Seconds a client waits for its answer (503 beyond).")] = 60.0,
    queue_timeout: Annotated[float, typer.Option(help="Seconds a request waits for a worker (503 beyond).")] = 30.0,
    header_timeout: Annotated[float, typer.Option(help="Seconds to send the request headers (408 beyond).")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="Seconds a request body may pause (408 beyond).")] = 15.0,
    body_deadline: Annotated[float, typer.Option(help="Seconds a request body may take in all (408 beyond).")] = 120.0,
    keep_alive: Annotated[int, typer.Option(help="Seconds an idle keep-alive connection stays open.")] = 5,
    max_connections: Annotated[int, typer.Option(help="Open connections per process, at most.")] = 1000,
    max_connections_per_client: Annotated[
        int, typer.Option(help="Open connections per client address (0: no cap; behind a proxy keep 0).")
    ] = 0,
    log_format: Annotated[str, typer.Option(help="json (one object per line, with request ids) or text.")] = "json",
) -> None:
    """Start the HTTP API (FastAPI + uvicorn); OpenAPI docs at http://HOST:PORT/docs."""
    if ctx.invoked_subcommand is not None:
        return
    from pneumo.api.auth import KeyStore
    from pneumo.api.server import ServeOptions, build_app
    from pneumo.api.server import serve as run_server
    from pneumo.api.settings import ApiSettings
    from pneumo.core.bundle import read_meta, resolve_bundle
    from pneumo.core.errors import PneumoError

    timeouts = (request_timeout, queue_timeout, header_timeout, body_timeout, body_deadline)
    if (
        (max_upload_mb is not None and max_upload_mb <= 0)
        or max_batch_files < 1
        or (max_concurrent or 1) < 1
        or (max_queue or 0) < 0
    ):
        fail("--max-upload-mb must be positive, --max-batch-files and --max-concurrent at least 1, --max-queue >= 0.")
    if workers < 1 or min(timeouts) <= 0 or keep_alive < 1 or max_connections < 16 or max_connections_per_client < 0:
        fail("--workers must be >= 1, every timeout > 0, --max-connections >= 16, --max-connections-per-client >= 0.")
    if log_format not in ("json", "text"):
        fail(f"--log-format is {log_format!r}; use json or text.")
    if api_keys is None and not is_loopback(host) and not insecure_no_auth:
        fail(
            f"refusing to serve {host} without authentication. Create a key (pneumo serve keys add NAME --scope "
            "predict --file keys.json) and pass --api-keys keys.json, or pass --insecure-no-auth if a proxy in "
            "front of this server authenticates every request."
        )
    settings = ApiSettings(
        api_keys=api_keys.resolve() if api_keys is not None else None,
        allowed_hosts=tuple(allowed_host) if allowed_host else default_allowed_hosts(host),
        cors_origins=tuple(cors_origin or ()),
        body_idle_timeout=body_timeout,
        body_deadline=body_deadline,
        queue_timeout=queue_timeout,
        deadline=request_timeout,
    )
    try:
        bundle = resolve_bundle(model)
        read_meta(bundle)  # a broken bundle or key file is one line here, not a traceback from the server
        if settings.api_keys is not None:
            KeyStore(settings.api_keys)
    except PneumoError as err:
        fail(err.message)
    options = ServeOptions(
        bundle=str(bundle.resolve()) if model is not None else None,
        max_upload_bytes=int(max_upload_mb * 2**20) if max_upload_mb is not None else None,
        max_batch_files=max_batch_files,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        settings=json.loads(settings.to_json()),
    )
    app = None
    if workers == 1:
        try:
            app = build_app(options)
        except PneumoError as err:
            fail(err.message)
    if api_keys is None:
        typer.echo(f"pneumo serve: NO AUTHENTICATION on {host} (loopback or --insecure-no-auth)", err=True)
    typer.echo(f"pneumo serve: http://{host}:{port} ({workers} process{'es' if workers > 1 else ''})", err=True)
    run_server(
        options,
        host=host,
        port=port,
        workers=workers,
        header_timeout=header_timeout,
        keep_alive=keep_alive,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        log_json=log_format == "json",
        app=app,
    )


keys_app = typer.Typer(no_args_is_help=True, help="Create, list and remove the API keys of `pneumo serve --api-keys`.")
serve_app.add_typer(keys_app, name="keys")
KeyFileOption = Annotated[Path, typer.Option("--file", "-f", help="The API key file (created if absent).")]


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="Who uses the key, e.g. pacs-bridge.")],
    file: KeyFileOption,
    scope: Annotated[list[str], typer.Option(help="predict (the predict routes) or read (/v1/model, /metrics).")],
) -> None:
    """Create a key; it is printed once, on standard output, and only its hash is stored."""
    from pneumo.api.auth import KeyFileError, add_key

    try:
        token = add_key(file, name, scope)
    except KeyFileError as err:
        fail(err.message)
    typer.echo(f"Key {name!r} ({', '.join(sorted(set(scope)))}) added to {file}; it is shown once:", err=True)
    typer.echo(token)


@keys_app.command("list")
def keys_list(file: KeyFileOption) -> None:
    """List the keys (names, scopes, creation dates; the keys themselves are not stored)."""
    from pneumo.api.auth import KeyFileError, read_key_file

    try:
        keys = read_key_file(file)
    except KeyFileError as err:
        fail(err.message)
    for key in keys:
        typer.echo(f"{key.name}\t{','.join(sorted(key.scopes))}\t{key.created}")


@keys_app.command("remove")
def keys_remove(name: Annotated[str, typer.Argument(help="The key's name.")], file: KeyFileOption) -> None:
    """Remove a key; a running server refuses it within a second."""
    from pneumo.api.auth import KeyFileError, remove_key

    try:
        remove_key(file, name)
    except KeyFileError as err:
        fail(err.message)
    typer.echo(f"Key {name!r} removed from {file}.", err=True)
