"""Start and stop Flower processes on loopback, and run the XPerT app through them with `flwr run`.

Used by `xpert simulate` (a SuperLink in simulation mode: virtual SuperNodes on Ray) and by the
Deployment Engine test (a SuperLink and real `flower-supernode` processes). Every process is started
in its own session with a private ``FLWR_HOME``; ``stop`` ends exactly those processes and their
descendants (found by pid), even after a failure. The environment disables what a loopback run must
not do: runtime dependency installation (``uv sync`` of the app's dependencies), update checks and
telemetry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import psutil
import tomli_w

CONNECTION = "xpert"
QUIET_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}
_NOISE = re.compile(r"mutex\.cc|RAW: |FutureWarning|warnings\.warn|RAY_ACCEL_ENV_VAR")


class LaunchError(RuntimeError):
    """A Flower process did not start, or a run did not finish (the message says where the logs are)."""


def repo_root() -> Path:
    """The Flower App directory (the repository root holding pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise LaunchError(f"{root} has no pyproject.toml: `flwr run` needs the repository checkout")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """An executable of this environment (the venv's bin/ first), so child processes match it."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


class FlowerProcesses:
    """Loopback SuperLink (+ SuperNodes) with a private FLWR_HOME; a context manager that stops them."""

    def __init__(self, log_dir: str | Path, workdir: str | Path | None = None, flwr_home: str | Path | None = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(workdir or os.getcwd())
        self._own_home = flwr_home is None
        self.flwr_home = Path(flwr_home or tempfile.mkdtemp(prefix="xpert-flwr-home-"))
        self.env = {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.flwr_home)}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.address: str | None = None

    # --- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed by the child's exit
        proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=dict(env or self.env), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_superlink(self, simulation: bool, timeout: float = 90.0) -> str:
        """A SuperLink (one HTTP port for the Fleet, Control and Runtime APIs); writes the connection."""
        port = free_port()
        cmd = [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
               "--disable-runtime-dependency-installation"]
        if simulation:
            cmd.append("--simulation")
        proc = self._spawn("superlink", cmd)
        self._wait_healthy(proc, f"http://127.0.0.1:{port}/health", "superlink", timeout)
        self.address = f"127.0.0.1:{port}"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: {"address": self.address, "insecure": True}}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))
        return self.address

    def start_supernode(self, partition_id: int, num_partitions: int) -> subprocess.Popen:
        """A real SuperNode (device) with its partition id; it polls the SuperLink for messages."""
        if self.address is None:
            raise LaunchError("start the SuperLink first")
        name = f"supernode-{partition_id}"
        env = {**self.env, "FLWR_HOME": str(self.flwr_home / name)}
        node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
        cmd = [_bin("flower-supernode"), "--insecure", "--superlink", self.address, "--host", "127.0.0.1",
               "--port", str(free_port()), "--node-config", node_config]
        return self._spawn(name, cmd, env)

    def _wait_healthy(self, proc: subprocess.Popen, url: str, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited with code {proc.returncode}; see {self.log_dir / name}.log")
            try:
                with urllib.request.urlopen(url, timeout=1) as res:
                    if res.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise LaunchError(f"{name} not healthy after {timeout:.0f}s; see {self.log_dir / name}.log")

    # --- runs -------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([_bin("flwr"), *args], cwd=self.workdir, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run(
        self,
        app_dir: str | Path,
        run_config: Mapping,
        federation_config: Mapping | None = None,
        timeout: float = 3600.0,
        echo: bool = True,
    ) -> dict:
        """`flwr run <app> xpert --run-config <toml> --stream`, log to ``run.log``; returns `flwr ls`'s run.

        Raises LaunchError if the run does not finish as ``finished:completed`` within ``timeout``.
        """
        cfg_file = self.log_dir / "run_config.toml"
        cfg_file.write_text(tomli_w.dumps(dict(run_config)))
        cmd = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(cfg_file), "--stream"]
        if federation_config:
            cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
        deadline = time.monotonic() + timeout
        found: list[int] = []
        log_path = self.log_dir / "run.log"
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(("flwr-run", proc))
        reader = threading.Thread(target=_pump, args=(proc, log_path, echo, found), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._stop_run(found[0] if found else None)
            raise LaunchError(f"run {found} did not finish within {timeout:.0f}s; see {log_path}") from None
        reader.join(timeout=10)
        run_id = found[0] if found else None
        if run_id is None:
            raise LaunchError(f"`flwr run` did not start a run; see {self.log_dir / 'run.log'}")
        status = self.wait_finished(run_id, timeout=max(30.0, deadline - time.monotonic()))
        if status.get("status") != "finished:completed":
            raise LaunchError(f"run {run_id} ended as {status.get('status')}: {status.get('status-details')}; "
                              f"see {self.log_dir / 'run.log'}")
        return status

    def status(self, run_id: int) -> dict:
        res = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout)["runs"]
        except (json.JSONDecodeError, KeyError) as err:
            raise LaunchError(f"`flwr ls` failed: {res.stdout[-500:]} {res.stderr[-500:]}") from err
        return runs[0] if runs else {}

    def wait_finished(self, run_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if str(status.get("status", "")).startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(1.0)

    def _stop_run(self, run_id: int | None) -> None:
        if run_id is not None:
            try:
                self.flwr("stop", str(run_id), CONNECTION, timeout=30)
            except subprocess.TimeoutExpired:
                pass

    # --- teardown ---------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this object started and all their descendants: SIGTERM, then SIGKILL."""
        victims: list[psutil.Process] = []
        for _, proc in reversed(self.procs):
            try:
                parent = psutil.Process(proc.pid)
                victims += parent.children(recursive=True)
                victims.append(parent)
            except psutil.NoSuchProcess:
                pass
        for p in victims:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        if self._own_home:
            shutil.rmtree(self.flwr_home, ignore_errors=True)

    def __enter__(self) -> FlowerProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pump(proc: subprocess.Popen, log_path: Path, echo: bool, found: list[int]) -> None:
    """Copy `flwr run --stream` output to the log (and, without Ray/absl noise, to the console)."""
    assert proc.stdout is not None
    with open(log_path, "w") as log:
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if not found and (m := re.search(r"Successfully started run (\d+)", line)):
                found.append(int(m.group(1)))
            if echo and not _NOISE.search(line):
                print(line, end="", flush=True)


def _toml_value(v: object) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
