"""Run real vLLM engines on a staggered workload and write what each produced as JSON.

    python engine_runner.py MODEL OUT.json [--scheduler NAME] [--budget N] ...   one engine
    python engine_runner.py --host MODEL                                         many engines

The host is how the test session runs its engines: one process, vLLM imported once,
each engine built in vLLM's in-process mode (VLLM_ENABLE_V1_MULTIPROCESSING=0; only
multi-rank engines spawn their workers), run, shut down and cleaned up before the next.
So the engines of the whole session share a process, which is what vllm-ext's
per-engine choices promise to survive: every result names the process, its
scheduler, block pool and attention classes. Requests come one per line on stdin as
JSON ({"args": [...], "out": PATH, "env": {...}, "model": PATH or absent for the host's});
each is answered with one line on
the file descriptor given after --reply-fd: "ok" or "failed: <why>".

Short prompts start decoding first; long prompts arrive while they decode, so a
scheduler's handling of prefills next to decodes shows in the step records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from unittest import mock

SHORT, LONG = (12, 20, 28, 36), (300, 520, 410)
MAX_TOKENS = 40
ARRIVE_AFTER_STEPS = (0, 0, 0, 0, 3, 6, 9)  # step at which each prompt is added


def prompts(vocab: int, shared_prefix: int = 0) -> list[list[int]]:
    """Deterministic token-id prompts (token ids avoid any tokenizer dependence); with
    `shared_prefix`, every prompt starts with the same that many tokens."""
    lengths = (*SHORT, *LONG)
    prefix = [(3 + 13 * j) % (vocab - 10) + 5 for j in range(shared_prefix)]
    return [prefix + [(7 + 31 * i + 17 * j) % (vocab - 10) + 5 for j in range(n)]
            for i, n in enumerate(lengths)]


def _attention_backends(worker) -> list[str]:
    """Runs in the worker: the attention backend class of every layer group."""
    return [f"{group.backend.__module__}.{group.backend.__qualname__}"
            for groups in worker.model_runner.attn_groups for group in groups]


def _clear_kv(worker) -> None:
    """Runs in each worker before any request: zero the KV cache, so that the rows
    written afterwards can be counted."""
    for kv in worker.model_runner.kv_caches:
        kv.zero_()


def _kv_rows_written(worker) -> int:
    """Runs in each worker: token rows of layer 0's keys that hold data ([blocks,
    kv_heads, 2 * block_size, head_dim], a block's keys first)."""
    kv = worker.model_runner.kv_caches[0]
    keys = kv[:, :, : kv.shape[2] // 2]
    return int((keys != 0).any(dim=-1).any(dim=1).sum())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheduler", default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--kv-admission", default=None)
    ap.add_argument("--tbt-slo-ms", type=float, default=None)
    ap.add_argument("--latency-model", default=None)
    ap.add_argument("--attn", default=None)
    ap.add_argument("--pod-impl", default=None)
    ap.add_argument("--kv-allocator", default=None)
    ap.add_argument("--kvp", type=int, default=None)
    ap.add_argument("--pipeline-parallel-size", type=int, default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=None)
    ap.add_argument("--spp", default=None, help="[--scheduler sarathi] on|off")
    ap.add_argument("--ttft-slo-s", type=float, default=None, help="[--scheduler mnemosyne]")
    ap.add_argument("--prefill-ms-per-token", type=float, default=None,
                    help="[--scheduler mnemosyne]")
    ap.add_argument("--kvp-interleave", type=int, default=None,
                    help="vLLM's cp_kv_cache_interleave_size: tokens per run dealt to a rank")
    for opt in ("layout", "page-size", "premap", "watermark", "physical-limit"):
        ap.add_argument(f"--vattention-{opt}", default=None)
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks of 32 tokens (few: forces preemption)")
    return ap


def run(model: str, argv: list[str]) -> dict:
    """Build one engine from `argv` (the options above), run the workload, shut it down."""
    args = _parser().parse_args(argv)
    import vllm_ext
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = dict(model=model, dtype="float32", enforce_eager=True, max_model_len=1024,
                  seed=0, disable_log_stats=False)
    if args.num_blocks is not None:
        # The longest request (520 + 40 tokens) must still fit on its own.
        kwargs.update(num_gpu_blocks_override=args.num_blocks, block_size=32, max_model_len=576)
    if args.block_size is not None:
        kwargs.update(block_size=args.block_size)
    if args.max_model_len is not None:
        kwargs.update(max_model_len=args.max_model_len)
    if args.kvp_interleave is not None:
        kwargs.update(cp_kv_cache_interleave_size=args.kvp_interleave)
    ranks = (args.kvp or args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1)
    for size in ("pipeline_parallel_size", "tensor_parallel_size"):
        if getattr(args, size) is not None:
            kwargs[size] = getattr(args, size)
    # Mnemosyne takes Sarathi's options under its own name.
    prefix = "mnemosyne" if args.scheduler == "mnemosyne" else "sarathi"
    chosen = {k: v for k, v in (("scheduler", args.scheduler), ("attn", args.attn),
                                (f"{prefix}_token_budget", args.budget),
                                (f"{prefix}_kv_admission", args.kv_admission),
                                (f"{prefix}_tbt_slo_ms", args.tbt_slo_ms),
                                (f"{prefix}_latency_model", args.latency_model),
                                ("mnemosyne_ttft_slo_s", args.ttft_slo_s),
                                ("mnemosyne_prefill_ms_per_token", args.prefill_ms_per_token),
                                ("pod_impl", args.pod_impl), ("kv_allocator", args.kv_allocator),
                                ("kvp", args.kvp), (f"{prefix}_spp", args.spp),
                                *((f"vattention_{o}", getattr(args, f"vattention_{o}"))
                                  for o in ("layout", "page_size", "premap", "watermark",
                                            "physical_limit"))) if v}
    if chosen:
        kwargs = vllm_ext.engine_kwargs(**chosen, **kwargs)
    if ranks > 1:
        # One core per rank: vLLM's automatic binding wants a NUMA node per rank.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            str(c % (os.cpu_count() or 1)) for c in range(ranks))
    engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
    try:
        return _workload(engine, args, ranks)
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        _shut_down(engine)


def _workload(engine, args, ranks: int) -> dict:
    import vllm_ext
    from vllm import SamplingParams
    from vllm_ext.allocators.poolstats import read_pool_dir, read_pool_files
    from vllm_ext.envs import stats_dir
    from vllm_ext.patches import reached_in

    vocab = engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    kvp = (args.kvp or 1) > 1
    if kvp:
        engine.collective_rpc(_clear_kv)
    before = vllm_ext.step_stats().steps
    todo = list(enumerate(prompts(vocab, args.shared_prefix)))
    tokens: dict[str, list[int]] = {}
    added: dict[str, float] = {}
    first_token: dict[str, float] = {}
    step = 0
    while todo or engine.has_unfinished_requests():
        while todo and ARRIVE_AFTER_STEPS[todo[0][0]] <= step:
            i, ids = todo.pop(0)
            engine.add_request(f"req-{i}", {"prompt_token_ids": ids}, params)
            added[f"req-{i}"] = time.monotonic()
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first_token:
                first_token[out.request_id] = time.monotonic()
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    core = getattr(engine.engine_core, "engine_core", None)  # the in-process EngineCore
    while core is not None and core.scheduler.has_requests():
        # The step that tells the workers which requests finished (and hands them the
        # last page orders); a separate engine-core process makes it on its own.
        engine.step()

    stats = vllm_ext.step_stats()
    pool = read_pool_dir(stats_dir())
    # The engine frees the last requests' blocks after their last step and hands the
    # orders to the worker one step later, on its own: give that a moment to land.
    deadline = time.monotonic() + 15
    while pool.samples and pool.samples[-1][1] > pool.samples[0][1] and \
            time.monotonic() < deadline:
        time.sleep(0.2)
        pool = read_pool_dir(stats_dir())
    scheduler = core.scheduler if core is not None else None
    return {
        "pid": os.getpid(),
        "attention_backends": sorted(set(engine.collective_rpc(_attention_backends)[0])),
        "scheduler_class": type(scheduler).__name__ if scheduler else None,
        "block_pool_class": (type(scheduler.kv_cache_manager.block_pool).__name__
                             if scheduler else None),
        "kv_rows_per_rank": engine.collective_rpc(_kv_rows_written) if kvp else None,
        "parallel": {k: getattr(engine.vllm_config.parallel_config, k) for k in (
            "tensor_parallel_size", "pipeline_parallel_size", "decode_context_parallel_size",
            "cp_kv_cache_interleave_size")},
        "tokens": tokens,
        "ttft_s": {r: first_token[r] - added[r] for r in first_token},
        "first_token_order": sorted(first_token, key=first_token.get),
        "config": {
            "max_num_batched_tokens": engine.vllm_config.scheduler_config.max_num_batched_tokens,
            "scheduler_cls": str(engine.vllm_config.scheduler_config.scheduler_cls),
            "scheduling_policy": str(engine.vllm_config.scheduler_config.policy),
            "additional_config": engine.vllm_config.additional_config,
        },
        "steps_recorded": stats.steps - before,
        "steps": [dataclasses.asdict(r) for r in stats.recent],
        "prefix_cache_hits": sum(m.value for m in engine.get_metrics()
                                 if m.name == "vllm:prefix_cache_hits"),
        "kv_pool": {"totals": pool.totals, "samples": pool.samples},
        # Each worker's pool on its own (one per tensor-parallel rank).
        "kv_pool_per_process": [{"totals": p.totals, "samples": p.samples}
                                for p in read_pool_files(stats_dir())],
        "patches_reached": sorted(reached_in(stats_dir())),
    }


def needed_patches(result: dict) -> set[str]:
    """The patches the engine's selection relies on (vllm-ext's registry), on the CPU."""
    from vllm_ext.patches import needed_by

    selection = result["config"]["additional_config"].get("vllm_ext", {})
    needed = {p.name for kind, settings in selection.items()
              for p in needed_by(kind, settings["name"], settings, "cpu")}
    if selection and result["parallel"]["pipeline_parallel_size"] > 1:
        needed.add("pp_eager_buffers")
    return needed


def _shut_down(engine) -> None:
    """Everything the engine held goes before the next one starts in this process."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine.engine_core.shutdown()
    del engine
    cleanup_dist_env_and_memory()
    gc.collect()


def _fresh_stats_dir() -> None:
    """Each engine its own step and pool statistics: the session's engines share a process."""
    import tempfile

    os.environ["VLLMEXT_STATS_DIR"] = tempfile.mkdtemp(prefix="vllm-ext-test-stats-")
    os.environ["VLLMEXT_STATS_OWNER"] = str(os.getpid())


def _setup_process() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # One compute thread, as vLLM's own CPU worker process binds itself to one core
    # (the other left to the engine loop): step times then match a served engine's,
    # and a busy second core cannot stall a two-thread OpenMP barrier.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # `--pod-impl triton` engines run Triton's interpreter, which must be on before this
    # process first imports Triton; vLLM runs no Triton on a CPU, so others are unaffected.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Lets collective_rpc carry a function to the workers (to ask which attention
    # backend they run); test harness only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def host(model: str, reply_fd: int) -> None:
    import traceback

    _setup_process()
    with os.fdopen(reply_fd, "w", buffering=1) as reply:
        for line in sys.stdin:
            request = json.loads(line)
            # The request's environment lasts for its engine only.
            with mock.patch.dict(os.environ, request.get("env", {})):
                _fresh_stats_dir()
                try:
                    result = run(request.get("model") or model, request["args"])
                    with open(request["out"], "w") as f:
                        json.dump(result, f)
                    reply.write("ok\n")
                except BaseException as e:  # noqa: BLE001 - the session's other engines go on
                    traceback.print_exc()
                    reply.write(f"failed: {type(e).__name__}: {str(e).splitlines()[:1]}\n")


def main() -> None:
    if sys.argv[1] == "--host":
        host(sys.argv[2], int(sys.argv[sys.argv.index("--reply-fd") + 1]))
        return
    _setup_process()
    result = run(sys.argv[1], sys.argv[3:])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
