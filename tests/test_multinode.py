"""vllm-ext on every node of a multi-node vLLM engine.

vLLM 0.32 spreads one engine over machines in two ways, and the pack must be loaded and
acting in the processes of every machine:

- multiprocessing (`vllm serve --nnodes 2 --node-rank R`, `--headless` on the nodes that
  serve no API): each node builds its own engine config from its own command line and
  its workers are made from that (`vllm/entrypoints/cli/serve.py: run_headless` hands
  its config to `MultiprocExecutor`); only the scheduler's output crosses to the other
  nodes. So the pack's flags must be on every node's command line: here two `vllm serve`
  processes on 127.0.0.1 stand for two nodes, one pipeline stage each, and the second
  stage's worker, on node 1, runs two of the pack's worker patches.
- Ray: the head's config is pickled to each Ray actor, which loads the general plugins in
  `WorkerWrapperBase.init_worker`. Ray cannot run on vLLM's CPU platform (its
  `ray_device_key` is empty: `vllm/v1/executor/ray_utils.py`, `initialize_ray_cluster`,
  "current platform cpu does not support ray"), so a fresh process is given what a Ray
  worker on another node gets from the head, the config and the environment vLLM's own
  functions choose, and runs vLLM's own worker initialisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_ext.tools.serve import (CPU_SERVE_ARGS, CPU_SERVE_ENV, ServerError, VllmServer,
                                  free_port, vllm_command)

POD = "vllm_ext.engine.pod.cpu.PodAttentionBackend"


# --- Multiprocessing multi-node: two `vllm serve` processes as two nodes --------------

class HeadlessNode(VllmServer):
    """`vllm serve ... --headless`: a node that runs workers and no API server, started at
    once. It has no /health to wait on; node 0's server becomes healthy only once every
    node's workers joined, so node 0's readiness is this node's too."""

    def __init__(self, model: Path, args: list[str], log_path: Path, env: dict[str, str]):
        super().__init__(model, args, log_path, env=env)
        self.cmd = [vllm_command(), "serve", str(model), *args]  # no API: no --host/--port
        self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _process_titles(pid: int) -> dict[int, str]:
    """pid -> title of a process and all its descendants (vLLM titles its engine core
    and workers `VLLM::EngineCore`, `VLLM::Worker_PP1`, ...)."""
    import psutil

    root = psutil.Process(pid)
    return {p.pid: " ".join(p.cmdline()) for p in (root, *root.children(recursive=True))}


def _named(titles: dict[int, str], title: str) -> int:
    found = [pid for pid, cmd in titles.items() if cmd.startswith(title)]
    assert len(found) == 1, f"one {title} expected among {titles}"
    return found[0]

def _node_args(port: int, rank: int, pack: list[str]) -> list[str]:
    """Node `rank`'s command line: one pipeline stage per node, and `pack`'s flags."""
    return [*CPU_SERVE_ARGS, "--max-model-len", "1024", "--pipeline-parallel-size", "2",
            "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--node-rank", str(rank), *(["--headless"] if rank else []), *pack]


def _node_env(rank: int, stats: Path) -> dict[str, str]:
    from vllm_ext import envs

    stats.mkdir(exist_ok=True)
    return {
        # Each node keeps its own statistics, and the patches' proof that they ran
        # (patches/base.py: `reached` writes "name pid" there), in a directory of its
        # own file system; a stale owner pid inherited from this test process would
        # make the front end replace it with a temporary one.
        envs.STATS_DIR: str(stats), envs.STATS_OWNER: "",
        # The address this node's message queues advertise to the other node.
        "VLLM_HOST_IP": "127.0.0.1",
        # One core each, as two machines would have their own.
        "VLLM_CPU_OMP_THREADS_BIND": str(rank % (os.cpu_count() or 1)),
    }


@pytest.mark.engine
@pytest.mark.timeout(600)
def test_two_nodes_give_stock_tokens_with_the_pack_acting_on_each(tiny_model, run_engine,
                                                                  tmp_path):
    from engine_runner import MAX_TOKENS, prompts
    from openai import OpenAI
    from vllm_ext.patches import reached_in

    # The same command line on both nodes, as vLLM wants it (model, parallelism) and as
    # the pack needs it: node 1's worker is built from node 1's own config, never node
    # 0's. One pipeline stage per node puts a worker that needs the pack on node 1: on
    # vLLM 0.32's CPU platform in eager mode a later stage has no buffer for the
    # activations it receives unless the pack's pp_eager_buffers patch acts, and it acts
    # only for an engine whose config has a vllm-ext selection. (Run by hand with the
    # pack's flags on node 0 only, before node_agreement, node 1's stage failed its first
    # step on vLLM's `assert self.intermediate_tensors is not None` and the engine died:
    # the next test.) `--attn pod` is a
    # second worker-side choice: the CPU platform honours the CUSTOM backend only
    # through the pack's cpu_custom_attn patch.
    pack = ["--scheduler", "sarathi", "--attn", "pod"]
    port = free_port()
    stats = {rank: tmp_path / f"stats-node{rank}" for rank in (0, 1)}
    started = time.monotonic()
    node1 = HeadlessNode(tiny_model, _node_args(port, 1, pack), tmp_path / "node1.log",
                         _node_env(1, stats[1]))
    node0 = VllmServer(tiny_model, _node_args(port, 0, pack), tmp_path / "node0.log",
                       startup_timeout=240, env=_node_env(0, stats[0]))
    try:
        try:
            url = node0.__enter__()
        except ServerError as e:
            raise AssertionError(f"{e}\nnode 1:\n{node1.log()[-4000:]}") from None
        up = time.monotonic()
        titles0, titles1 = _process_titles(node0.proc.pid), _process_titles(node1.proc.pid)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
        # The session's own stock engine runs these prompts (tests/engine_runner.py).
        out = client.completions.create(
            model=str(tiny_model), prompt=prompts(vocab), max_tokens=MAX_TOKENS,
            temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens = {f"req-{c.index}": list(c.token_ids) for c in out.choices}
        served = time.monotonic()
    finally:
        node1.interrupt()  # both nodes shut down at once
        node0.stop()
        node1.stop()
    print(f"two nodes: up in {up - started:.1f} s, requests {served - up:.1f} s, "
          f"stopped in {time.monotonic() - served:.1f} s")

    # Exact: greedy float32 tokens equal a stock single-process vLLM's, every request.
    stock = run_engine()
    assert len(tokens) == len(stock["tokens"]) == 7
    assert tokens == stock["tokens"]

    log0, log1 = node0.log_path.read_text(), node1.log()
    assert "headless multiproc executor" in log1  # node 1 really ran as a worker node
    assert "vllm-ext active: scheduler=sarathi" in log0 and "attn=pod" in log0
    reached0, reached1 = reached_in(str(stats[0])), reached_in(str(stats[1]))
    core0 = _named(titles0, "VLLM::EngineCore")
    worker0, worker1 = _named(titles0, "VLLM::Worker_PP0"), _named(titles1, "VLLM::Worker_PP1")
    # Node 1: its flags were read (its own front end), and its worker ran the pack's
    # worker patches: the second stage's buffer, and POD chosen as CUSTOM.
    assert reached1["cli_flags"] == {node1.proc.pid}
    assert reached1["pp_eager_buffers"] == {worker1}
    assert reached1["cpu_custom_attn"] == reached1["pod_cpu_internals"] == {worker1}
    # The scheduler is node 0's alone: node 1 never builds one.
    assert "scheduler_internals" not in reached1
    assert reached0["scheduler_internals"] == {core0}
    assert reached0["cpu_custom_attn"] == {worker0}
    assert "pp_eager_buffers" not in reached0  # the first stage needs no incoming buffer
    # Each node's worker compared its node's vllm-ext record with the other's, and agreed.
    assert reached0["node_agreement"] == {worker0} and reached1["node_agreement"] == {worker1}


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_a_node_started_without_the_pack_flags_is_refused_by_both(tiny_model, tmp_path):
    # Node 1 given vLLM's flags only: before this check, its pipeline stage failed its
    # first request mid-step (see above). Now every worker compares its node's record
    # with the other node's once vLLM's distributed environment is up, before any model
    # is loaded, and both nodes stop, each naming what both run.
    port = free_port()
    node1 = HeadlessNode(tiny_model, _node_args(port, 1, []), tmp_path / "node1.log",
                         _node_env(1, tmp_path / "stats-node1"))
    node0 = VllmServer(tiny_model, _node_args(port, 0, ["--scheduler", "sarathi"]),
                       tmp_path / "node0.log", startup_timeout=240,
                       env=_node_env(0, tmp_path / "stats-node0"))
    try:
        with pytest.raises(ServerError):
            node0.__enter__()
        node1.proc.wait(120)
    finally:
        node1.interrupt()
        node0.stop()
        node1.stop()
    assert node1.proc.returncode != 0
    for log in (node0.log_path.read_text(), node1.log()):
        assert ("NodeMismatchError: vllm-ext: the nodes of this engine were started "
                "differently: node ") in log
        assert "with scheduler=sarathi(" in log
        assert "with nothing selected (stock vLLM)" in log
    assert "Loading weights" not in node0.log_path.read_text()  # refused before the model


# --- Ray: vLLM's worker initialisation with what a Ray worker on another node gets ---

def _ray_head(model: str, out: str) -> None:
    """The head (`vllm serve` with Ray): build the engine config and compute, with vLLM's
    own functions, the environment each Ray executor hands its workers."""
    import cloudpickle
    import vllm_ext
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.ray.ray_env import get_env_vars_to_copy
    from vllm.v1.executor.ray_env_utils import get_driver_env_vars
    from vllm.v1.executor.ray_utils import WORKER_SPECIFIC_ENV_VARS
    from vllm_ext import envs

    # The pack's front end makes its own statistics directory here, as `vllm serve` does.
    kwargs = vllm_ext.engine_kwargs(model=model, dtype="float32", enforce_eager=True,
                                    max_model_len=256, scheduler="sarathi", attn="pod")
    config = EngineArgs(**kwargs).create_engine_config()
    # Ray serialises the actors' arguments with cloudpickle.
    Path(out, "config.pkl").write_bytes(cloudpickle.dumps(config))
    # RayExecutorV2 (0.32's default) sends the head's whole environment, applied with
    # setdefault; RayDistributedExecutor (VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0) sends only
    # the names get_env_vars_to_copy picks (VLLM_*, HF_*, ... and vLLM's registry).
    v1 = get_env_vars_to_copy(exclude_vars=WORKER_SPECIFIC_ENV_VARS,
                              additional_vars=set(current_platform.additional_env_vars))
    Path(out, "env.json").write_text(json.dumps({
        "v2": get_driver_env_vars(WORKER_SPECIFIC_ENV_VARS),
        "v1": {name: os.environ[name] for name in v1 if name in os.environ},
        "stats_dir": envs.stats_dir()}))
    # Exiting removes the front end's temporary statistics directory (atexit), so the
    # path V2 hands on names nothing on the worker's side: as on another machine.


def _ray_worker(out: str, executor: str) -> None:
    """A Ray worker: vLLM's own initialisation of one (`WorkerWrapperBase`, what both Ray
    executors' actors are), its model loaded, then what the pack did in this process."""
    import cloudpickle
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    sent = json.loads(Path(out, "env.json").read_text())
    wrapper = WorkerWrapperBase(rpc_rank=0)
    if executor == "v2":
        # RayWorkerProc.initialize_worker (vllm/v1/executor/ray_executor_v2.py) does
        # exactly this before WorkerProc builds the worker. (That class cannot be
        # imported without Ray installed.)
        for key, value in sent["v2"].items():
            os.environ.setdefault(key, value)
    else:
        # RayDistributedExecutor's collective_rpc("update_environment_variables", ...)
        wrapper.update_environment_variables([sent["v1"]])
    config = cloudpickle.loads(Path(out, "config.pkl").read_bytes())
    wrapper.init_worker([dict(vllm_config=config, local_rank=0, rank=0, is_driver_worker=True,
                              distributed_init_method=f"tcp://127.0.0.1:{free_port()}")])
    wrapper.init_device()
    wrapper.load_model()

    from vllm_ext import envs, patches
    from vllm_ext.config import ExtConfig

    layers = config.compilation_config.static_forward_context.values()
    print(json.dumps({
        "applied": sorted(p.name for p in patches.PATCHES if p.applied),
        "refused": patches.refused(),
        "calls": {p.name: p.calls for p in patches.PATCHES if p.calls},
        "backends": sorted({f"{b.__module__}.{b.__qualname__}" for b in
                            (getattr(m, "attn_backend", None) for m in layers) if b}),
        "selection": ExtConfig.of(config).describe(),
        "stats_dir": envs.stats_dir(),
    }))


def test_a_ray_style_worker_on_another_node_runs_the_pack(tiny_model, tmp_path):
    here = Path(__file__)
    head = subprocess.run(
        [sys.executable, str(here), "ray-head", str(tiny_model), str(tmp_path)],
        env={k: v for k, v in {**os.environ, **CPU_SERVE_ENV}.items()
             if not k.startswith("VLLMEXT_")}, capture_output=True, text=True, timeout=300)
    assert head.returncode == 0, head.stderr[-3000:]
    sent = json.loads((tmp_path / "env.json").read_text())
    # What crosses to the workers: V2 carries the head's VLLMEXT_* (its statistics
    # directory among them, a path on the head's file system), V1 none of them
    # (vLLM copies the prefix VLLM_, which VLLMEXT_ does not have).
    assert sent["v2"]["VLLMEXT_STATS_DIR"] == sent["stats_dir"]
    assert not any(k.startswith("VLLMEXT_") for k in sent["v1"])
    assert not os.path.exists(sent["stats_dir"])

    # A Ray worker process starts with its own node's environment (that of `ray start`
    # there); RayExecutorV2, 0.32's default, then fills in the head's. (The V1
    # executor's worker, given `sent["v1"]` and so no statistics directory at all, is
    # `python tests/test_multinode.py ray-worker DIR v1` after a head run; it passes the
    # same checks, and is left out here for the 8 s a third vLLM process costs.)
    node_env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                "HOME": os.environ.get("HOME", "/root")}
    run = subprocess.run([sys.executable, str(here), "ray-worker", str(tmp_path), "v2"],
                         env=node_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "vllm-ext" not in run.stderr, run.stderr  # no refusal, no failed load
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["refused"] == {}
    # The plugin registered through vLLM's load_general_plugins and patched vLLM here,
    # and the selection that travelled in the config is honoured: the model's layers
    # got POD, through the cpu_custom_attn patch.
    assert {"cli_flags", "cpu_custom_attn", "pp_eager_buffers", "kv_pool_alloc",
            "page_ops_worker"} <= set(found["applied"])
    assert found["selection"] == ("scheduler=sarathi(token_budget=256, kv_admission=full); "
                                  "attn=pod(impl=torch, kvp=1)")
    assert found["backends"] == [POD]
    assert found["calls"]["cpu_custom_attn"] >= 1
    # With the head's statistics directory, which names nothing on this "node", the pack
    # works on and writes nothing: the patches' proof of a reach is skipped, the path
    # was not created here.
    assert found["stats_dir"] == sent["stats_dir"]
    assert not os.path.exists(sent["stats_dir"])

if __name__ == "__main__":
    if sys.argv[1] == "ray-head":
        _ray_head(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "ray-worker":
        _ray_worker(sys.argv[2], sys.argv[3])
