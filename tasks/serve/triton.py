"""Run the real `tritonserver` on the model repository `llmops export` writes.

    proc = start(settings)            # bound to 127.0.0.1, explicit model control, waits for readiness
    proc.load("chat-gpt")             # through the repository API, with the admin key
    proc.stop()                       # SIGTERM to its process group

With serve.triton.restrict_admin (the default) the APIs that change or reveal what the server runs
(model-repository: index, load with a configuration override, unload; model-config; shared-memory; trace;
logging) answer only requests that carry the per-install admin key in the `llmops-admin-key` header
(gRPC: `triton-grpc-protocol-llmops-admin-key` metadata); `admin_headers(settings)` gives it to the
project's own clients. Inference, health, metadata and statistics stay open on loopback.

On one machine the binary is the one the `nvidia-pytriton` wheel ships (installed with --no-deps:
only the binary is used). Its Python backend runs our model.py in a stub process whose Python is
the first one on PATH, so the stub gets its own small environment (`serve.triton.serve_env`,
numpy<2; with numpy 2 the backend's tensors come back as zeros, see README, Serving). In
production the same repository runs in NVIDIA's tritonserver container (docker-compose.yml).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.config import PROJECT_DIR, Settings
from tasks.credentials import install_secret
from tasks.errors import ServiceError
from tasks.procs import Component, launch, reap

# One restricted group for both endpoints (Triton allows an API in one group only). Statistics stay
# open: the metrics port, which Triton cannot restrict, publishes the same counters.
ADMIN_APIS = ("model-repository", "model-config", "shared-memory", "trace", "logging")
ADMIN_HEADER = "llmops-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # Triton's gRPC frontend prefixes the key
ADMIN_KEY_ENV = "LLMOPS_TRITON_ADMIN_KEY"


class TritonError(ServiceError):
    """tritonserver is missing, did not start, or refused a repository request."""


class AdminKeyRefused(TritonError):
    """tritonserver refused an admin request for want of the right admin key: a retry gets the same."""

    retryable = False


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("the tritonserver binary is missing: "
                          "`make install` installs nvidia-pytriton (--no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def server_dir(settings: Settings) -> Path:
    """The tritonserver install: serve.triton.server_dir, else the one in the nvidia-pytriton wheel."""
    d = settings.serve.triton.server_dir
    if d is not None:
        if not (Path(d) / "bin" / "tritonserver").is_file():
            raise TritonError(f"serve.triton.server_dir={d}: no bin/tritonserver there")
        return Path(d)
    return _pytriton_dir()


def serve_env(settings: Settings) -> Path:
    env = settings.serve.triton.serve_env
    env = env if env.is_absolute() else PROJECT_DIR / env
    if not (env / "bin" / "python").exists():
        raise TritonError(f"{env}: the model server's Python environment is missing; run `make install`")
    return env


def backend_dir(settings: Settings) -> Path:
    """backends/ with the Python backend's stub for this Python in python/: the install's own when it
    has one (NVIDIA's container), else a private copy of the wheel's with the matching stub put in."""
    src = server_dir(settings)
    if (src / "backends" / "python" / "triton_python_backend_stub").exists():
        return src / "backends"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dest = settings.paths.var_dir / "triton" / f"backends-py{version}"
    stub = dest / "python" / "triton_python_backend_stub"
    if not stub.exists():
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "backends", tmp, symlinks=True)
        shutil.copy2(src / "python_backend_stubs" / version / "triton_python_backend_stub",
                     tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def server_env(settings: Settings) -> dict[str, str]:
    libs = server_dir(settings).parent.parent / "nvidia_pytriton.libs"
    # LIBDIR first, or the stub loads the system libpython
    ld = [sysconfig.get_config_var("LIBDIR"), str(libs)]
    if os.environ.get("LD_LIBRARY_PATH"):
        ld.append(os.environ["LD_LIBRARY_PATH"])
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(ld),
            "PATH": f"{serve_env(settings) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONNOUSERSITE": "1", "NO_PROXY": "127.0.0.1,localhost"}


def admin_key(settings: Settings) -> str | None:
    """The admin key of this install ($LLMOPS_TRITON_ADMIN_KEY, else var/secrets/triton_admin_key, created
    with mode 0600 on first use); None when serve.triton.restrict_admin is off."""
    if not settings.serve.triton.restrict_admin:
        return None
    return install_secret(settings.paths.var_dir / "secrets" / "triton_admin_key", env=ADMIN_KEY_ENV)


def admin_headers(settings: Settings) -> dict[str, str]:
    """HTTP headers for the restricted APIs (empty when they are not restricted)."""
    key = admin_key(settings)
    return {ADMIN_HEADER: key} if key else {}


def grpc_admin_headers(settings: Settings) -> dict[str, str]:
    """gRPC metadata for the restricted APIs (tritonclient's `headers=`; empty when not restricted)."""
    key = admin_key(settings)
    return {GRPC_ADMIN_HEADER: key} if key else {}


def command(settings: Settings, repository: Path, http_port: int, grpc_port: int, metrics_port: int,
            models: tuple[str, ...] = ()) -> list[str]:
    host = settings.stack.host
    cmd = [str(server_dir(settings) / "bin" / "tritonserver"), f"--model-repository={repository}",
           "--model-control-mode=explicit", f"--backend-directory={backend_dir(settings)}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", f"--metrics-address={host}", f"--metrics-port={metrics_port}",
           "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=false",
           "--exit-on-error=false", "--log-verbose=0", "--log-info=true",
           f"--exit-timeout-secs={settings.serve.triton.exit_timeout_s}"]
    key = admin_key(settings)
    if key:
        # tritonserver takes the key on its command line only: this machine's other users can read it in
        # /proc/<pid>/cmdline unless /proc is mounted with hidepid=2 (README, Security)
        group = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={key}"
        cmd += [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]
    return cmd + [f"--load-model={m}" for m in models]


def _refused(r, what: str) -> TritonError:
    """The error for a repository request Triton answered with something other than 200."""
    if r.status_code == 403 and "restricted" in r.text:
        return AdminKeyRefused(
            f"{what}: {r.status_code} {r.text[:300]} (the server restricts its admin APIs: send the "
            f"`{ADMIN_HEADER}` header with this install's admin key, triton.admin_headers(settings); a "
            "server started with another key, or with serve.triton.restrict_admin on while this "
            "client has it off, needs a restart: `llmops serve down` and `llmops serve`)")
    return TritonError(f"{what}: {r.status_code} {r.text[:500]}")


@dataclass
class TritonProcess:
    proc: subprocess.Popen
    http_url: str
    grpc_url: str
    metrics_url: str
    log: Path
    repository: Path
    admin: dict[str, str]  # HTTP headers for the restricted APIs (empty when they are open)
    grpc_admin: dict[str, str]  # the same as gRPC metadata

    def http(self):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, network_timeout=300.0, connection_timeout=10.0)

    def grpc(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def wait_ready(self, timeout: float, models: tuple[str, ...] = ()) -> None:
        wait_ready(self.http_url, timeout, models, self.log, self.proc)

    def load(self, name: str, timeout: float = 120.0) -> None:
        load(self.http_url, name, headers=self.admin)
        self.wait_ready(timeout, (name,))

    def unload(self, name: str) -> None:
        unload(self.http_url, name, headers=self.admin)

    def model_config(self, name: str) -> dict:
        return model_config(self.http_url, name, headers=self.admin)

    def stop(self, grace: float = 15.0) -> None:
        stop_group(self.proc.pid, grace)
        self.proc.wait(timeout=5)


def wait_ready(http_url: str, timeout: float, models: tuple[str, ...] = (), log: Path | None = None,
               proc: subprocess.Popen | None = None) -> None:
    """Poll KServe v2 /v2/health/live and /v2/models/<m>/ready until all answer 200."""
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    with httpx.Client(base_url=f"http://{http_url}", timeout=5.0) as http:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                break
            try:
                if http.get("/v2/health/live").status_code == 200:
                    waiting = [m for m in models if http.get(f"/v2/models/{m}/ready").status_code != 200]
                    if not waiting:
                        return
                    last = "server live, models not ready: " + ", ".join(waiting)
            except httpx.HTTPError as e:  # connection refused while it starts
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = (f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None
             else f"not ready ({last})")
    raise TritonError(f"tritonserver at {http_url} {state} within {timeout:.0f}s; log {log}:\n{tail}")


def load(http_url: str, name: str, config: dict | None = None, headers: dict[str, str] | None = None) -> None:
    """(Re)load a model through the repository API: picks up every version directory on disk. With
    `config` (a model configuration as /v2/models/<name>/config returns it) the model is loaded with
    that configuration instead of its config.pbtxt; nothing on disk changes. A plain load after such
    an override keeps the override while the model directory is unchanged: load the old
    configuration back explicitly (tasks/serve/tune.py does). `headers`: admin_headers(settings)."""
    import json

    import httpx

    body = {"parameters": {"config": json.dumps(config)}} if config is not None else None
    r = httpx.post(f"http://{http_url}/v2/repository/models/{name}/load", json=body, headers=headers,
                   timeout=600.0)
    if r.status_code != 200:
        raise _refused(r, f"loading {name!r} into {http_url} failed")


def model_config(http_url: str, name: str, headers: dict[str, str] | None = None) -> dict:
    """The configuration a loaded model runs with (JSON of Triton's ModelConfig, defaults filled in)."""
    import httpx

    r = httpx.get(f"http://{http_url}/v2/models/{name}/config", headers=headers, timeout=30.0)
    if r.status_code != 200:
        raise _refused(r, f"model {name!r} has no configuration at {http_url} (not loaded?)")
    return r.json()


def unload(http_url: str, name: str, headers: dict[str, str] | None = None) -> None:
    """Unload a model (all its versions) through the repository API; requests for it then get 4xx."""
    import httpx

    r = httpx.post(f"http://{http_url}/v2/repository/models/{name}/unload", headers=headers, timeout=120.0)
    if r.status_code != 200:
        raise _refused(r, f"unloading {name!r} from {http_url} failed")


def stop_group(pgid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap(pgid)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ports(settings: Settings, http: int | None, grpc: int | None,
           metrics: int | None) -> tuple[int, int, int]:
    t = settings.serve.triton
    return http or t.http_port, grpc or t.grpc_port, metrics or t.metrics_port


def component(settings: Settings, repository: Path | None = None, http_port: int | None = None,
              grpc_port: int | None = None, metrics_port: int | None = None, models: tuple[str, ...] = (),
              log: Path | None = None) -> Component:
    """How to start tritonserver on `repository` (default: the project's) with `models` loaded; healthy
    once live and every one of `models` is ready."""
    repository = Path(repository or settings.paths.triton_repository)
    repository.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port, metrics_port = _ports(settings, http_port, grpc_port, metrics_port)
    base = f"http://{settings.stack.host}:{http_port}"
    return Component("tritonserver",
                     command(settings, repository, http_port, grpc_port, metrics_port, models),
                     server_env(settings), log or settings.paths.var_dir / "log" / "tritonserver.log",
                     repository, (f"{base}/v2/health/live", *(f"{base}/v2/models/{m}/ready" for m in models)),
                     headers=admin_headers(settings))


def start(settings: Settings, repository: Path | None = None, http_port: int | None = None,
          grpc_port: int | None = None, metrics_port: int | None = None, models: tuple[str, ...] = (),
          log: Path | None = None, wait: bool = True) -> TritonProcess:
    """Start tritonserver in its own process group; with `wait`, return once it and `models` are ready."""
    t = settings.serve.triton
    c = component(settings, repository, http_port, grpc_port, metrics_port, models, log)
    http_port, grpc_port, metrics_port = _ports(settings, http_port, grpc_port, metrics_port)
    host = settings.stack.host
    tp = TritonProcess(launch(c), f"{host}:{http_port}", f"{host}:{grpc_port}",
                       f"http://{host}:{metrics_port}/metrics", c.log, c.cwd, admin_headers(settings),
                       grpc_admin_headers(settings))
    if wait:
        try:
            tp.wait_ready(t.startup_timeout_s, models)
        except TritonError:
            tp.stop()
            raise
    return tp
