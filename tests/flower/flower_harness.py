"""Real Flower processes on loopback for the tests: SuperLink, SuperNodes, ``flwr run``.

Every process is started here with its own log file and stopped by its PID (and the PIDs
of the children it started, such as SuperExec), whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Seconds between the SuperExec's polls for a new task (a message to run, at a SuperNode; the
#: ServerApp, at the SuperLink). Flower's default is 1 s; docs/deployment.md sets the same.
TASK_POLL_INTERVAL = "0.1"


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL=TASK_POLL_INTERVAL,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def stamp_lines(stream: IO[bytes] | None, log: Path) -> threading.Thread:
    """Copy ``stream`` (a process's output, and its children's) into ``log``, each line
    prefixed with the wall-clock time (``HH:MM:SS.mmm``): Flower's own lines carry none, and
    the time between a SuperNode's "Receiving" and "Sending" lines is what one message cost."""

    def copy() -> None:
        assert stream is not None
        with log.open("ab") as f:
            for line in iter(stream.readline, b""):
                now = time.time()
                ms = int(now * 1000) % 1000
                f.write(time.strftime("%H:%M:%S", time.localtime(now)).encode())
                f.write(f".{ms:03d} ".encode() + line)
                f.flush()

    t = threading.Thread(target=copy, name=f"log {log.name}", daemon=True)
    t.start()
    return t


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class Proc:
    """A process this harness started, with its log."""

    name: str
    popen: subprocess.Popen
    log: Path
    reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process and the processes it started, by their PIDs."""
        family = descendants(self.pid)
        _signal(self.pid, sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        end = time.monotonic() + 5
        for pid in family:  # children normally exit with their parent
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        if self.reader is not None and self.popen.poll() is not None:
            self.reader.join(2)  # the last lines of a process that exited
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(lines[-n:])


@dataclass
class Cluster:
    """SuperLink and SuperNodes of one test, all on 127.0.0.1 with free ports."""

    root: Path
    tls: tuple[Path, Path, Path] | None = None  # (ca, server cert, server key)
    auth: bool = False
    port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)
    superlink: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)
        conn = [f'address = "127.0.0.1:{self.port}"']
        conn += [f'root-certificates = "{self.tls[0]}"'] if self.tls else ["insecure = true"]
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n[superlink.test]\n' + "\n".join(conn) + "\n"
        )

    def _start(self, name: str, cmd: list[str]) -> Proc:
        log = self.root / f"{name}.log"
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.root
        )
        proc = Proc(name, p, log, stamp_lines(p.stdout, log))
        self.procs.append(proc)
        return proc

    def security_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        ca, cert, key = self.tls
        return [
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(cert),
            "--ssl-keyfile",
            str(key),
        ]

    def start_superlink(self, database: Path | None = None, simulation: bool = False) -> Proc:
        cmd = [str(BIN / "flower-superlink"), *self.security_args(), "--port", str(self.port)]
        if simulation:
            cmd.append("--simulation")
        if self.auth:
            cmd.append("--enable-supernode-auth")
        if database is not None:
            cmd += ["--database", str(database)]
        self.superlink = self._start("superlink", cmd)
        wait_port(self.port, 30, self.superlink)
        return self.superlink

    def start_supernode(
        self, site: str, data: Path, key: Path | None = None, wait: bool = True, **extra: str
    ) -> Proc:
        """Start a SuperNode for ``site``; with ``wait``, return once its API port listens."""
        cfg = {"site": site, "data-path": str(data), "state-dir": str(self.root / "sites"), **extra}
        node_config = " ".join(f"{k}='{v}'" for k, v in cfg.items())
        cmd = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        cmd += ["--root-certificates", str(self.tls[0])] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        cmd += ["--node-config", node_config]
        for attempt in range(3):
            # A port found free can be taken by another process before the SuperNode binds
            # it: wait until it listens, and start again on another port if it lost the race.
            port = free_port()
            proc = self._start(f"supernode-{site}", [*cmd, "--port", str(port)])
            if not wait:
                self.nodes[site] = proc
                return proc
            try:
                wait_port(port, 30, proc)
            except RuntimeError:
                if attempt == 2 or "address already in use" not in proc.tail():
                    raise
                self.procs.remove(proc)
                continue
            self.nodes[site] = proc
            return proc
        raise AssertionError("unreachable")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def run_app(self, app_dir: Path, run_config: dict[str, object], *extra: str) -> int:
        """``flwr run`` (``extra``: more options); returns the run ID."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        args = ["run", str(app_dir), "test", "--run-config", overrides, "--format", "json"]
        res = self.flwr(*args, *extra)
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout}\n{res.stderr}\n{self.logs()}")
        return int(json.loads(res.stdout[res.stdout.index("{") :])["run-id"])

    def run_status(self, run_id: int) -> str:
        res = self.flwr("ls", "test", "--run-id", str(run_id), "--format", "json")
        try:
            runs = json.loads(res.stdout[res.stdout.index("{") :])["runs"]
        except (ValueError, KeyError):
            return f"unknown ({res.stdout.strip()[:200]} {res.stderr.strip()[:200]})"
        return str(runs[0]["status"]) if runs else "unknown"

    def logs(self, n: int = 30) -> str:
        return "\n".join(p.tail(n) for p in self.procs)

    def stop_all(self) -> None:
        """Stop every process of the cluster (and their children) by PID, all at once."""
        running = [p for p in self.procs if p.popen.poll() is None]
        family = {pid for p in running for pid in descendants(p.pid)}
        for p in running:
            _signal(p.pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for p in running:
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(p.pid, signal.SIGKILL)
                p.popen.wait(5)
        end = time.monotonic() + 3
        while any(_alive(pid) for pid in family) and time.monotonic() < end:
            time.sleep(0.1)
        for pid in family:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return "'" + str(v) + "'"


def wait_port(port: int, timeout: float, proc: Proc | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def wait_result(cluster: Cluster, out_dir: Path, run_id: int, timeout: float) -> dict:
    """Wait until the ServerApp wrote a final ``result.json`` (or the run finished without)."""
    path = out_dir / "result.json"
    end = time.monotonic() + timeout
    # `flwr ls` (a run that finished without a result) is a fresh process: rarely
    next_ls = time.monotonic() + 60
    while time.monotonic() < end:
        if path.exists():
            res = json.loads(path.read_text())
            if res.get("status") != "running" and res.get("run_id") == run_id:
                return res
        if time.monotonic() > next_ls:
            status = cluster.run_status(run_id)
            if status.startswith("finished"):
                time.sleep(1)
                res = json.loads(path.read_text()) if path.exists() else {}
                if res.get("status") in ("completed", "failed") and res.get("run_id") == run_id:
                    return res
                raise RuntimeError(f"run {run_id} {status} without a result\n{cluster.logs()}")
            next_ls = time.monotonic() + 60
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id}: no result after {timeout} s\n{cluster.logs()}")
