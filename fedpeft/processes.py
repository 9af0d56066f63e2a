"""Start, watch and stop Flower's own executables (flower-superlink, flower-supernode, flwr) as child
processes. Everything started here runs in its own process group and is stopped with it: Flower's
launchers detach helpers (flower-superexec, flwr-serverapp, flwr-clientapp) that would otherwise
outlive an interrupted command. Shared by deploy/, the simulation's own session (fedpeft.simulation.engine)
and a device's memory figures (fedpeft.device.tasks), so it sits below all three."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from fedpeft.errors import FedpeftError

QUIET = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}


def executable(name: str) -> str:
    """Flower's executables from this Python's environment first (a venv need not be activated)."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FedpeftError(f"{name} not found: install fedpeft (it brings flwr) in this environment")
    return found


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's processes: our venv's bin first on PATH (the SuperLink starts
    `flower-superexec` by name), Flower's home folder inside our own folder, telemetry off."""
    env = dict(os.environ)
    env.update(QUIET)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env.update(extra or {})
    return env


class Child:
    """A child process in its own process group, output to a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str], name: str) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the whole group and everything it spawned, then SIGKILL what is left."""
        stop_tree(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        self._log.close()


@dataclass(frozen=True)
class Proc:
    ppid: int
    rss: int  # bytes
    cmdline: str
    session: int = 0  # session id (setsid)


def process_table() -> dict[int, Proc]:
    """Every live process from /proc (Linux); empty elsewhere, where the process group must do."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            table[int(d.name)] = Proc(int(fields[1]), int(fields[21]) * page, cmd, int(fields[3]))
    return table


def session_members(sid: int) -> list[int]:
    """This user's live processes in session `sid` (all that a session leader and its children started,
    even after the leader died and they were re-parented)."""
    uid = os.getuid()
    members = []
    for pid, proc in process_table().items():
        if proc.session == sid:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}").stat().st_uid == uid:
                    members.append(pid)
    return members


def stop_session(sid: int, timeout: float = 10.0, spare: int | None = None) -> int:
    """Stop every process of session `sid` (but `spare`); returns how many there were."""
    pids = [p for p in session_members(sid) if p != spare]
    stop_processes(pids, timeout)
    return len(pids)


def stop_processes(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is left after `timeout` seconds."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    _signal([p for p in pids if _running(p)], signal.SIGKILL)


def descendants(pid: int, table: dict[int, Proc] | None = None) -> list[int]:
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, proc in table.items():
        children.setdefault(proc.ppid, []).append(p)
    todo, seen = [pid], []
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def peak_rss(pid: int | None = None) -> int:
    """A process's peak resident set (VmHWM, bytes); 0 when it is gone. Without /proc (macOS) only this
    process's own peak is known."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if pid is None or pid == os.getpid():
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
    return 0


def tree_peak_rss(root: int | None = None) -> int:
    """Sum of the peak RSS of `root` (default: this process) and of every live process below it: an upper
    bound of the tree's peak, since the processes need not have peaked at the same moment."""
    root = root or os.getpid()
    return sum(peak_rss(p) for p in [root, *descendants(root)])


def pss(pid: int | None = None) -> int:
    """A process's proportional set size (bytes): its private pages plus its share of the pages it maps
    with others (libraries, the interpreter), so that the PSS of a process tree sums to what the tree
    really occupies, where a sum of RSS counts every shared page once per process. 0 without /proc."""
    try:
        with open(f"/proc/{pid or 'self'}/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:")), 0)
    except OSError:
        return 0


def tree_pss(root: int | None = None) -> int:
    """PSS of `root` (default: this process) and every live process below it, now."""
    root = root or os.getpid()
    return sum(pss(p) for p in [root, *descendants(root)])


def cgroup_peak() -> int | None:
    """Peak memory of this process's cgroup (v2 memory.peak, bytes): what a device that runs in a cgroup
    of its own (a systemd unit, a container) has used at most, page cache included. None on cgroup v1 or
    where the file is not readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line[3:] for line in lines if line.startswith("0::"))
        return int(Path(f"/sys/fs/cgroup{path}/memory.peak").read_text().split()[0])
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class PeakPss:
    """The highest PSS of a process tree, sampled every `every` seconds while active (the kernel keeps a
    peak of each process's RSS, VmHWM, but none of PSS)."""

    def __init__(self, root: int, every: float = 0.5) -> None:
        self.root, self.every, self.peak = root, every, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        self.peak = max(self.peak, tree_pss(self.root))
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    @contextlib.contextmanager
    def active(self) -> Any:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.sample()


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


def stop_tree(pid: int, timeout: float = 15.0) -> None:
    """Stop a process, its process group and its descendants (some of Flower's start their own sessions)."""
    pids = [pid, *descendants(pid)]
    groups = set()
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p))
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGTERM)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    for g in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(g, signal.SIGKILL)
    _signal([p for p in pids if _running(p)], signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


def wait_listening(host: str, port: int, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise FedpeftError(f"{child.name} exited at start ({child.log_tail(1)}); see {child.log_path}")
        if port_in_use(host, port):
            return
        time.sleep(0.3)
    raise FedpeftError(f"{child.name} did not listen on {host}:{port} within {timeout:.0f} s")


def flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> Any:
    """Run the `flwr` CLI with --format json and return its parsed output; one-line error on failure."""
    cmd = [executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FedpeftError(f"flwr {args[0]} did not answer within {timeout:.0f} s") from None
    text = done.stdout.strip()
    start = text.find("{")
    try:
        out = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if done.returncode != 0 or out.get("success") is False:
        text = out.get("error-message") or done.stderr or done.stdout or "?"
        lines = [line.strip() for line in str(text).splitlines() if line.strip()]
        raise FedpeftError(f"flwr {' '.join(args[:2])} failed: {lines[-1] if lines else '?'}")
    return out
