"""The README's main job: a synthetic model served with `--scheduler sarathi`, one
streamed request through the openai client, then a clean stop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vllm_ext.serve import CPU_SERVE_ARGS, VllmServer, stream_completion


def run(workdir: str | Path = "demo", max_tokens: int = 32) -> int:
    from openai import OpenAI

    from vllm_ext.models import make_model

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = make_model(workdir / "tiny", preset="tiny")
    args = [*CPU_SERVE_ARGS, "--max-model-len", "1024", "--scheduler", "sarathi"]
    log = workdir / "server.log"
    print(f"$ vllm serve {model} {' '.join(args)}   (log: {log}; ready in about a minute)")
    t0 = time.monotonic()
    with VllmServer(model, args, log) as url:
        print(f"healthy at {url} after {time.monotonic() - t0:.0f} s; streaming one completion:")
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        tokens = stream_completion(client, str(model), "hello world", max_tokens,
                                   on_text=lambda t: print(t, end="", flush=True)).tokens
        print(f"\n{tokens} tokens streamed; stopping the server")
        active = [l for l in log.read_text().splitlines() if "vllm-ext active" in l]
        print(active[-1].split("] ", 1)[-1] if active else "warning: no vllm-ext start-up line")
    print("server stopped cleanly")
    return 0 if tokens == max_tokens and active else 1


if __name__ == "__main__":
    sys.exit(run())
