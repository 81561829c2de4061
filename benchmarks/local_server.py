"""`bitdelta serve` as a child process on loopback, for the CPU serving benchmarks (serve_cpu, soak,
ray_overhead): a free port, the server started with its output in a log file, ready once /health
answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, deltas: Path, options: list[str], log: Path, seconds: float = 300) -> tuple[str, subprocess.Popen]:
    """(its URL, the process) of `python -m bitdelta.server BASE --deltas DELTAS OPTIONS` on a free
    port, once healthy; the server's output goes to `log`, which a failure to start quotes."""
    port = free_port()
    command = [sys.executable, "-m", "bitdelta.server", str(base), "--deltas", str(deltas), "--port", str(port), *options]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{url} did not become healthy:\n{log.read_text()}")
