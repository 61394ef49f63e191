"""Run one real vLLM engine on a staggered workload and write what it produced as JSON.

Run as a script (vLLM spawns processes, and one engine per process keeps tests
independent):  python engine_runner.py MODEL OUT.json [--scheduler NAME] [--budget N]
[--attn NAME] [--pod-impl torch|triton]

Short prompts start decoding first; long prompts arrive while they decode, so a
scheduler's handling of prefills next to decodes shows in the step records.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
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
    ap.add_argument("--spp", default=None, help="[--scheduler sarathi] on|off")
    ap.add_argument("--kvp-interleave", type=int, default=None,
                    help="vLLM's cp_kv_cache_interleave_size: tokens per run dealt to a rank")
    for opt in ("layout", "page-size", "premap", "watermark", "physical-limit"):
        ap.add_argument(f"--vattention-{opt}", default=None)
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None,
                    help="KV blocks of 32 tokens (few: forces preemption)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # Lets collective_rpc carry a function to the worker (to ask which attention
    # backend it runs); test harness only.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

    import vllm_ext
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    kwargs = dict(model=args.model, dtype="float32", enforce_eager=True, max_model_len=1024,
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
    ranks = (args.kvp or 1) * (args.pipeline_parallel_size or 1)
    if args.pipeline_parallel_size is not None:
        kwargs.update(pipeline_parallel_size=args.pipeline_parallel_size)
    if ranks > 1:
        # One core per rank: vLLM's automatic binding wants a NUMA node per rank.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                              "|".join(str(c % (os.cpu_count() or 1)) for c in range(ranks)))
    chosen = {k: v for k, v in (("scheduler", args.scheduler), ("attn", args.attn),
                                ("sarathi_token_budget", args.budget),
                                ("sarathi_kv_admission", args.kv_admission),
                                ("sarathi_tbt_slo_ms", args.tbt_slo_ms),
                                ("sarathi_latency_model", args.latency_model),
                                ("pod_impl", args.pod_impl), ("kv_allocator", args.kv_allocator),
                                ("kvp", args.kvp), ("sarathi_spp", args.spp),
                                *((f"vattention_{o}", getattr(args, f"vattention_{o}"))
                                  for o in ("layout", "page_size", "premap", "watermark",
                                            "physical_limit"))) if v}
    if chosen:
        kwargs = vllm_ext.engine_kwargs(**chosen, **kwargs)
    before = vllm_ext.step_stats().steps
    engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
    vocab = engine.model_config.get_vocab_size()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    kvp = (args.kvp or 1) > 1
    if kvp:
        engine.collective_rpc(_clear_kv)

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

    stats = vllm_ext.step_stats()
    from vllm_ext.allocators.poolstats import read_pool_dir
    from vllm_ext.envs import stats_dir

    pool = read_pool_dir(stats_dir())
    # The engine frees the last requests' blocks after their last step and hands the
    # orders to the worker one step later, on its own: give that a moment to land.
    deadline = time.monotonic() + 15
    while pool.samples and pool.samples[-1][1] > pool.samples[0][1] and \
            time.monotonic() < deadline:
        time.sleep(0.2)
        pool = read_pool_dir(stats_dir())
    backends = sorted(set(engine.collective_rpc(_attention_backends)[0]))
    result = {
        "attention_backends": backends,
        "kv_rows_per_rank": engine.collective_rpc(_kv_rows_written) if kvp else None,
        "parallel": {k: getattr(engine.vllm_config.parallel_config, k) for k in (
            "tensor_parallel_size", "pipeline_parallel_size", "decode_context_parallel_size",
            "cp_kv_cache_interleave_size")},
        "tokens": tokens,
        "ttft_s": {r: first_token[r] - added[r] for r in first_token},
        "config": {
            "max_num_batched_tokens": engine.vllm_config.scheduler_config.max_num_batched_tokens,
            "scheduler_cls": str(engine.vllm_config.scheduler_config.scheduler_cls),
            "additional_config": engine.vllm_config.additional_config,
        },
        "steps_recorded": stats.steps - before,
        "steps": [dataclasses.asdict(r) for r in stats.recent],
        "prefix_cache_hits": sum(m.value for m in engine.get_metrics()
                                 if m.name == "vllm:prefix_cache_hits"),
        "kv_pool": {"totals": pool.totals, "samples": pool.samples},
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
