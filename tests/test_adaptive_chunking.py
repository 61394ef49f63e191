"""Adaptive chunking against a toy engine (no vLLM): every step's predicted time stays
within the TBT target, chunks shrink as a long prompt's context grows, and every request
finishes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_ext.schedulers.adaptive import AdaptiveChunking
from vllm_ext.schedulers.latency import LatencyModel, StepShape
from vllm_ext.schedulers.request import ReqState

MODEL = LatencyModel((0.004, 2e-5, 4e-9, 3e-4, 1e-7))


def _run(policy, prompts, outputs, decoders=0, decoder_ctx=1000, max_steps=5000):
    """A toy engine: `decoders` requests already decoding, the prompts queued; each step
    runs the planned budget: one token per decode, then chunks in order."""
    reqs = [ReqState(f"d{i}", 0, decoder_ctx, decoder_ctx + 1, decoder_ctx)
            for i in range(decoders)]
    reqs += [ReqState(f"p{i}", i + 1, n, n, 0) for i, n in enumerate(prompts)]
    want_out = {**{f"d{i}": 10**9 for i in range(decoders)},
                **{f"p{i}": o for i, o in enumerate(outputs)}}
    steps = []
    for _ in range(max_steps):
        active = [r for r in reqs if r.num_tokens - r.num_prompt_tokens < want_out[r.req_id]]
        if not [r for r in active if not r.req_id.startswith("d")]:
            break
        decodes = [r for r in active if r.is_decode]
        prefills = [r for r in active if not r.is_decode]
        plan = policy.plan(decodes, prefills)
        steps.append(plan)
        assert plan.tokens == len(decodes) + sum(n for n, _ in plan.chunks) <= policy.max_tokens
        assert plan.predicted_s == MODEL.predict(StepShape(plan.chunks,
                                                           tuple(d.num_computed + 1 for d in decodes)))
        by_id = {r.req_id: r for r in active}
        done = {d.req_id: ReqState(d.req_id, d.arrival, d.num_prompt_tokens, d.num_tokens + 1,
                                   d.num_computed + 1) for d in decodes}
        for (n, ctx), req in zip(plan.chunks, prefills):
            assert ctx == req.num_computed
            computed = req.num_computed + n
            finished_prompt = computed == req.num_tokens
            done[req.req_id] = ReqState(req.req_id, req.arrival, req.num_prompt_tokens,
                                        req.num_tokens + finished_prompt, computed)
        reqs = [done.get(r.req_id, by_id.get(r.req_id, r)) for r in reqs]
    else:
        raise AssertionError("requests did not finish")
    return steps


def test_long_prompt_chunks_shrink_with_context_and_steps_stay_in_budget():
    policy = AdaptiveChunking(MODEL, tbt_slo_s=0.05, max_tokens=8192)
    steps = _run(policy, [60000], [4], decoders=16)
    sizes = [p.chunks[0][0] for p in steps if p.chunks]
    assert sum(sizes) == 60000
    assert sizes[0] > 2 * sizes[-2]  # the last chunk is the remainder
    assert all(a >= b for a, b in zip(sizes, sizes[1:-1]))
    assert all(p.predicted_s <= 0.05 for p in steps)


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.integers(1, 5000), min_size=1, max_size=6),
       decoders=st.integers(0, 32), slo_ms=st.sampled_from([10, 30, 100]),
       max_tokens=st.sampled_from([256, 2048]))
def test_never_exceeds_the_predicted_budget_and_everything_finishes(prompts, decoders, slo_ms,
                                                                     max_tokens):
    policy = AdaptiveChunking(MODEL, tbt_slo_s=slo_ms / 1000, max_tokens=max_tokens)
    steps = _run(policy, prompts, [3] * len(prompts), decoders=decoders)
    decode_only = MODEL.predict(StepShape((), (1000,) * decoders))
    for p in steps:
        # Over the target only when the decodes alone exceed it and one minimal chunk
        # has to go through so that prompts progress.
        assert p.predicted_s <= slo_ms / 1000 or (
            len(p.chunks) <= 1 and (not p.chunks or p.chunks[0][0] <= 32)
            and decode_only > slo_ms / 1000 - MODEL.predict(StepShape(((32, 5000),))))


def test_online_correction_learns_the_drift_and_shrinks_the_chunks():
    from vllm_ext.schedulers.adaptive import OnlineCorrection

    c = OnlineCorrection()
    for _ in range(60):
        c.observe(0.100, 0.125)  # steps run 25% longer than the profile says
    assert abs(c.factor - 1.25) < 0.01
    c.observe(0.100, 30.0)  # one stalled step moves it by at most weight * (limit - factor)
    assert c.factor < 1.25 + 0.1 * (2.0 - 1.25) + 1e-9
    c.observe(0.0, 1.0)  # no prediction: ignored
    policy = AdaptiveChunking(MODEL, tbt_slo_s=0.05, max_tokens=4096)
    decodes = [ReqState(f"d{i}", 0, 900, 1000, 999) for i in range(8)]
    prompt = [ReqState("p", 1, 8000, 8000, 2000)]
    plain, corrected = policy.plan(decodes, prompt), policy.plan(decodes, prompt, 1.25)
    assert corrected.chunks[0][0] < plain.chunks[0][0]
    # the uncorrected plan would overrun the target by the drift; the corrected one does not
    assert 1.25 * plain.predicted_s > 0.05 >= corrected.predicted_s
    assert abs(corrected.predicted_s - 1.25 * MODEL.predict(
        StepShape(corrected.chunks, tuple(d.num_computed + 1 for d in decodes)))) < 1e-12
