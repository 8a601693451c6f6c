"""Run the real `tritonserver` on the model repository `llmops export` writes.

    proc = start(settings)            # bound to 127.0.0.1, explicit model control, waits for readiness
    proc.load("chat-gpt")             # through the repository API
    proc.stop()                       # SIGTERM to its process group

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
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import PROJECT_DIR, Settings


class TritonError(RuntimeError):
    pass


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("the tritonserver binary is missing: `make install` installs nvidia-pytriton (--no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def serve_env(settings: Settings) -> Path:
    env = settings.serve.triton.serve_env
    env = env if env.is_absolute() else PROJECT_DIR / env
    if not (env / "bin" / "python").exists():
        raise TritonError(f"{env}: the model server's Python environment is missing; run `make install`")
    return env


def backend_dir(settings: Settings) -> Path:
    """A private copy of the wheel's backends/ with the Python 3.11 stub placed in python/."""
    src = _pytriton_dir()
    dest = settings.paths.var_dir / "triton" / "backends"
    stub = dest / "python" / "triton_python_backend_stub"
    if not stub.exists():
        tmp = dest.with_name("backends.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "backends", tmp, symlinks=True)
        shutil.copy2(src / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
                     tmp / "python" / "triton_python_backend_stub")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def server_env(settings: Settings) -> dict[str, str]:
    libs = _pytriton_dir().parent.parent / "nvidia_pytriton.libs"
    ld = [sysconfig.get_config_var("LIBDIR"), str(libs)]  # LIBDIR first, or the stub loads the system libpython
    if os.environ.get("LD_LIBRARY_PATH"):
        ld.append(os.environ["LD_LIBRARY_PATH"])
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(ld),
            "PATH": f"{serve_env(settings) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONNOUSERSITE": "1", "NO_PROXY": "127.0.0.1,localhost"}


def command(settings: Settings, repository: Path, http_port: int, grpc_port: int, metrics_port: int,
            models: tuple[str, ...] = ()) -> list[str]:
    host = settings.stack.host
    cmd = [str(_pytriton_dir() / "bin" / "tritonserver"), f"--model-repository={repository}",
           "--model-control-mode=explicit", f"--backend-directory={backend_dir(settings)}",
           f"--http-address={host}", f"--http-port={http_port}", f"--grpc-address={host}", f"--grpc-port={grpc_port}",
           f"--metrics-address={host}", f"--metrics-port={metrics_port}", "--allow-metrics=true",
           "--allow-gpu-metrics=false", "--strict-readiness=false", "--exit-on-error=false",
           "--log-verbose=0", "--log-info=true"]
    return cmd + [f"--load-model={m}" for m in models]


@dataclass
class TritonProcess:
    proc: subprocess.Popen
    http_url: str
    grpc_url: str
    metrics_url: str
    log: Path
    repository: Path
    _loaded: set[str] = field(default_factory=set)

    def http(self):
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(self.http_url, network_timeout=300.0, connection_timeout=10.0)

    def grpc(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def wait_ready(self, timeout: float, models: tuple[str, ...] = ()) -> None:
        wait_ready(self.http_url, timeout, models, self.log, self.proc)

    def load(self, name: str, timeout: float = 120.0) -> None:
        load(self.http_url, name)
        self.wait_ready(timeout, (name,))

    def stop(self, grace: float = 15.0) -> None:
        stop_group(self.proc.pid, grace)
        self.proc.wait(timeout=5)


def wait_ready(http_url: str, timeout: float, models: tuple[str, ...] = (), log: Path | None = None,
               proc: subprocess.Popen | None = None) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url, connection_timeout=2.0, network_timeout=5.0)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if client.is_server_live() and all(client.is_model_ready(m) for m in models):
                return
            last = "server live, models not ready: " + ", ".join(m for m in models if not client.is_model_ready(m))
        except Exception as e:  # noqa: BLE001 - connection refused while it starts
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None else f"not ready ({last})"
    raise TritonError(f"tritonserver at {http_url} {state} within {timeout:.0f}s; log {log}:\n{tail}")


def load(http_url: str, name: str) -> None:
    """(Re)load a model through the repository API: picks up every version directory on disk."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        httpclient.InferenceServerClient(http_url, network_timeout=600.0).load_model(name)
    except InferenceServerException as e:
        raise TritonError(f"loading {name!r} into {http_url} failed: {e}") from None


def stop_group(pgid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(settings: Settings, repository: Path | None = None, http_port: int | None = None,
          grpc_port: int | None = None, metrics_port: int | None = None, models: tuple[str, ...] = (),
          log: Path | None = None, wait: bool = True) -> TritonProcess:
    """Start tritonserver in its own process group; with `wait`, return once it and `models` are ready."""
    t = settings.serve.triton
    repository = Path(repository or settings.paths.triton_repository)
    repository.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port, metrics_port = http_port or t.http_port, grpc_port or t.grpc_port, metrics_port or t.metrics_port
    log = log or settings.paths.var_dir / "log" / "tritonserver.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(settings, repository, http_port, grpc_port, metrics_port, models)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=server_env(settings), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=repository)
    host = settings.stack.host
    tp = TritonProcess(proc, f"{host}:{http_port}", f"{host}:{grpc_port}", f"http://{host}:{metrics_port}/metrics",
                       log, repository)
    if wait:
        try:
            tp.wait_ready(t.startup_timeout_s, models)
        except TritonError:
            tp.stop()
            raise
    return tp
