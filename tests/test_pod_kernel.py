"""POD-Attention kernel against the PyTorch reference: output and LSE over hybrid
batches of awkward shapes, a captured decode launch replayed over new batches written in
place, the builds the launcher asks for. On a CPU the kernel runs under Triton's
interpreter; with CUDA the same cases run compiled, and the `gpu` tests capture CUDA
graphs and count Triton's builds."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is decorated

import triton
import triton.language as tl

from vllm_ext.kernels import pod, pod_attention, reference
from vllm_ext.kernels.pod import Workspace, plan, tile_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_batch(decode_ctx, prefills, heads=4, kv_heads=2, head_dim=64, block_size=16,
               dtype=torch.float32, seed=0):
    """decode_ctx: context lengths of the decodes; prefills: (query tokens, context)
    pairs, context >= query tokens (the rest is earlier context). Blocks are
    scattered through a cache with spare blocks, as vLLM's allocator leaves them."""
    g = torch.Generator().manual_seed(seed)
    seqs = [(1, c) for c in decode_ctx] + list(prefills)
    need = [(c + block_size - 1) // block_size for _, c in seqs]
    num_blocks = sum(need) + 5
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_table = torch.zeros(len(seqs), max(need, default=1), dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        block_table[s, :n] = torch.tensor(perm[used:used + n], dtype=torch.int32)
        used += n
    q_lens = torch.tensor([q for q, _ in seqs], dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    query = torch.randn(int(qsl[-1]), heads, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    to = lambda t: t.to(DEVICE)
    return (to(query), to(k_cache), to(v_cache), to(block_table), to(seq_lens), to(qsl),
            len(decode_ctx))


def check(batch, dtype=torch.float32, splits=None, scale=0.1, workspace=None):
    query, *_, num_decodes = batch
    p = plan(batch[5], batch[4], num_decodes, query.shape[1], batch[1].shape[2],
             block_m=tile_for(query.shape[2], query.dtype).block_m, decode_splits=splits)
    out = torch.full_like(query, float("nan"))  # unwritten outputs show as NaN
    got, lse = pod_attention(*batch, scale=scale, out=out, return_lse=True, pod_plan=p,
                             workspace=workspace)
    want, want_lse = reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in batch],
                                             scale=scale, return_lse=True)
    assert got is out and not torch.isnan(got).any()
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.cpu(), want_lse, atol=TOL[dtype], rtol=TOL[dtype])


CASES = {
    # name: (decode contexts, (prefill query tokens, context) pairs, kwargs)
    "mixed": ([5, 40, 33], [(20, 20), (10, 50)], {}),
    "decodes-only": ([1, 17, 64, 100], [], {}),
    "prefills-only": ([], [(37, 37), (5, 5)], {}),
    "prefill-with-context": ([9], [(24, 131)], {}),
    "one-token-prefill": ([3], [(1, 1), (1, 70)], {}),
    "ends-on-block-boundary": ([32, 48], [(16, 64)], {"block_size": 16}),
    "long-prefill-many-tiles": ([], [(150, 150)], {"heads": 2, "kv_heads": 1}),
    "mha": ([12, 7], [(9, 30)], {"heads": 3, "kv_heads": 3}),
    "gqa-8": ([12, 7], [(9, 30)], {"heads": 8, "kv_heads": 1}),
    "gqa-4": ([40], [(19, 19)], {"heads": 8, "kv_heads": 2}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batches(name):
    decodes, prefills, kw = CASES[name]
    check(make_batch(decodes, prefills, **kw))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    check(make_batch([21, 3], [(13, 40)], heads=2, kv_heads=1, head_dim=head_dim))


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_block_sizes(block_size):
    check(make_batch([block_size, 2 * block_size + 1], [(11, block_size + 5)],
                     block_size=block_size))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype):
    check(make_batch([30, 8], [(17, 45)], dtype=dtype), dtype=dtype)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_split_kv_decodes_merge_exactly(splits):
    # 7 splits of a 5-token context leave empty splits: their weight must be zero.
    check(make_batch([5, 90, 64], [(12, 12)]), splits=splits)


def workspace_for(batch, splits):
    """A workspace that holds `batch` split `splits` ways."""
    query, key_cache, *_, num_decodes = batch
    p = plan(batch[5], batch[4], num_decodes, query.shape[1], key_cache.shape[2],
             decode_splits=splits)
    return Workspace.for_plan(p, query.shape[0], query.shape[1], key_cache.shape[2],
                              query.shape[2], query.device)


def test_repeated_launches_reuse_their_counters():
    batch = make_batch([20, 33], [(14, 30)])
    ws = workspace_for(batch, splits=3)
    for splits in (3, 3, 1, 2):
        check(batch, splits=splits, workspace=ws)
    assert not ws.counters.any() and not ws.merge.any()  # each launch leaves them zero


@pytest.mark.parametrize("contexts, used", [([5, 600, 1100], [1, 2, 4]), ([300, 2], [1, 1])])
def test_short_contexts_split_fewer_ways(monkeypatch, contexts, used):
    """The plan splits by batch size alone (on 32 SMs, 3 decodes of 2 KV heads each 5
    ways, 2 decodes 8 ways); the kernel gives each split SPLIT_KEYS keys at least, so a
    shorter context uses fewer."""
    batch = make_batch(contexts, [(9, 40)])
    with monkeypatch.context() as m:
        m.setattr(pod, "_num_sms", lambda device: 32)
        p = plan(batch[5], batch[4], batch[6], 4, 2)
    assert p.splits == 32 // (2 * len(contexts)) and p.split_keys == pod.SPLIT_KEYS
    assert [min(max(c // p.split_keys, 1), p.splits) for c in contexts] == used
    ws = Workspace.for_plan(p, batch[0].shape[0], 4, 2, 64, batch[0].device)
    out = torch.full_like(batch[0], float("nan"))
    pod_attention(*batch, scale=0.1, out=out, pod_plan=p, workspace=ws)
    want = reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in batch],
                                   scale=0.1)
    torch.testing.assert_close(out.cpu(), want, atol=2e-5, rtol=2e-5)


def test_a_launch_that_raised_does_not_poison_the_next(monkeypatch):
    batch = make_batch([20, 33], [(14, 30)])
    ws = workspace_for(batch, splits=2)
    check(batch, splits=2, workspace=ws)

    class Aborted(RuntimeError):
        pass

    class HalfLaunch:
        # Takes tiles and counts finished programs, as a launch cut short would.
        def __getitem__(self, grid):
            def launch(**kwargs):
                kwargs["counter_ptr"][:3] += 1
                kwargs["merge_ptr"][:1] += 1
                raise Aborted
            return launch

    monkeypatch.setattr(pod, "pod_attention_kernel", HalfLaunch())
    with pytest.raises(Aborted):
        pod_attention(*batch, scale=0.1, workspace=ws,
                      pod_plan=plan(batch[5], batch[4], batch[6], 4, 2, decode_splits=2))
    monkeypatch.undo()
    check(batch, splits=2, workspace=ws)


def test_a_workspace_refuses_a_launch_it_cannot_hold():
    batch = make_batch([20, 33], [(14, 30)])
    with pytest.raises(ValueError, match="too small for this launch: partial rows"):
        check(batch, splits=3, workspace=workspace_for(batch, splits=2))


def test_plan_from_host_metadata_puts_the_work_list_on_the_kernels_device():
    batch = make_batch([5, 9], [(20, 20)])
    p = plan(batch[5].cpu(), batch[4].cpu(), 2, 4, 2, block_m=64, device=DEVICE)
    assert p.prefill_work.device.type == torch.device(DEVICE).type
    assert p.prefill_work.tolist() == [[2, 0]] and p.num_prefill_tiles == 4


def test_plans_into_a_workspace_reuse_its_work_buffer():
    ws = Workspace(DEVICE, decode_groups=8, partial_rows=0, lse_rows=64, dim_p=64,
                   work_entries=8)
    q_lens = [1, 1, 130, 64, 1, 65]  # a one-token prompt after the decodes: a prefill tile
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    p = plan(qsl, torch.ones(6), 2, 4, 2, block_m=64, workspace=ws)
    assert p.prefill_work.tolist() == [[2, 0], [2, 64], [2, 128], [3, 0], [4, 0], [5, 0],
                                       [5, 64]]
    assert p.num_prefill_tiles == 7 * 4 and p.decodes == 2
    again = plan(qsl[:3], torch.ones(2), 2, 4, 2, block_m=64, workspace=ws)
    assert again.prefill_work.data_ptr() == p.prefill_work.data_ptr() == ws.work.data_ptr()


@pytest.mark.parametrize("q_lens, decodes", [
    ([1, 1, 0, 0], 4),  # a decode batch padded for its CUDA graph: planned as 4 decodes
    ([1, 0, 5], 1),  # a request without tokens before a prefill is no padding: no tiles
    ([0, 0], 0),
])
def test_cuda_graph_padding_plans_as_the_batch_it_pads_to(q_lens, decodes):
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    leading = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    p = plan(qsl, torch.zeros(len(q_lens)), leading, 4, 2, block_m=64)
    assert p.decodes == decodes and p.num_decode_tiles == decodes * 2
    assert p.num_prefill_tiles == (4 if 5 in q_lens else 0)


@dataclass
class Launch:
    grid: tuple
    kwargs: dict

    def addresses(self) -> tuple:
        """What a CUDA graph holds of a launch: its grid, each tensor's address and each
        scalar's value."""
        return self.grid, tuple((k, v.data_ptr() if torch.is_tensor(v) else v)
                                for k, v in self.kwargs.items())


class Recorder:
    """Stands in for the kernel (its signature too): records every launch and runs it
    while `run` is set."""

    def __init__(self, kernel, run: bool = True) -> None:
        self.kernel, self.fn, self.run, self.launches = kernel, kernel.fn, run, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.launches.append(Launch(grid, kwargs))
            if self.run:
                self.kernel[grid](**kwargs)
        return launch


class DecodeSlots:
    """A model runner's buffers for decode batches of `slots` requests (what a CUDA graph
    captured for that size reads), written in place every step as vLLM's runner writes
    them: a batch of fewer requests is padded with requests that have no query token,
    context 0 and the null block (block 0, NaN here: it must never be read). Two output
    rows past the batch's show any write past the output."""

    def __init__(self, slots, heads, kv_heads, head_dim, dtype, width, block_size=16):
        self.slots, self.heads, self.kv_heads, self.width = slots, heads, kv_heads, width
        self.g = torch.Generator().manual_seed(0)
        cache = (1 + slots * width, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(cache, generator=self.g).to(dtype).to(DEVICE)
        self.v_cache = torch.randn(cache, generator=self.g).to(dtype).to(DEVICE)
        self.k_cache[0], self.v_cache[0] = float("nan"), float("nan")
        self.query = torch.empty(slots, heads, head_dim, dtype=dtype, device=DEVICE)
        self.outputs = torch.empty(slots + 2, heads, head_dim, dtype=dtype, device=DEVICE)
        self.out = self.outputs[:slots]
        self.qsl = torch.zeros(slots + 1, dtype=torch.int32, device=DEVICE)
        self.seq_lens = torch.zeros(slots, dtype=torch.int32, device=DEVICE)
        self.table = torch.zeros(slots, width, dtype=torch.int32, device=DEVICE)

    def write(self, contexts: list[int]) -> int:
        n = len(contexts)
        self.query.copy_(torch.randn(self.query.shape, generator=self.g))
        self.query[n:] = float("nan")
        self.qsl.copy_(torch.tensor([min(i, n) for i in range(self.slots + 1)]))
        self.seq_lens.copy_(torch.tensor(contexts + [0] * (self.slots - n)))
        blocks = 1 + torch.randperm(self.slots * self.width, generator=self.g)
        self.table.zero_()
        self.table[:n] = blocks[:n * self.width].view(n, self.width)
        return n

    def plan(self, n: int, workspace: Workspace | None):
        """As the metadata builder plans: from the host copy of query_start_loc."""
        return plan(self.qsl.cpu(), self.seq_lens, n, self.heads, self.kv_heads,
                    device=DEVICE, workspace=workspace)

    def launch(self, n: int, p, workspace: Workspace):
        return pod_attention(self.query, self.k_cache, self.v_cache, self.table, self.seq_lens,
                             self.qsl, n, 0.1, out=self.out, pod_plan=p, workspace=workspace)

    def poison(self, n: int) -> None:
        self.outputs[:n], self.outputs[n:] = float("nan"), -7.0  # what is written shows

    def check(self, n: int, tol: float) -> None:
        """Exact attention for the real requests; the padding rows and the rows past the
        output untouched."""
        want = reference.pod_attention(
            self.query[:n].cpu(), self.k_cache.cpu(), self.v_cache.cpu(), self.table[:n].cpu(),
            self.seq_lens[:n].cpu(), self.qsl[:n + 1].cpu(), n, 0.1)
        torch.testing.assert_close(self.out[:n].float().cpu(), want.float(), atol=tol, rtol=tol)
        assert (self.outputs[n:] == -7.0).all()


def test_a_captured_decode_launch_replays_batches_written_in_place(monkeypatch):
    """A CUDA graph's replay, on the CPU: the launch recorded at capture (6 decodes of
    context 1, as vLLM captures) runs again, same tensors and scalars, after another
    batch padded to 6 is written into the same buffers. Planned into the workspace (for
    a 32-SM GPU: 12 query groups, split 2 ways), each batch asks for exactly the captured
    launch; replayed, it gives exact attention, splits merged, padding left alone."""
    slots = DecodeSlots(6, 4, 2, 64, torch.float32, width=64)

    def on_32_sms(make, *args):  # the builder's side, as on a GPU of 32 SMs
        with monkeypatch.context() as m:
            m.setattr(pod, "_num_sms", lambda device: 32)
            return make(*args)

    n = slots.write([1] * 6)
    ws = Workspace.for_plan(on_32_sms(slots.plan, n, None), 6, 4, 2, 64, torch.device(DEVICE))
    captured_plan = on_32_sms(slots.plan, n, ws)
    recorder = Recorder(pod.pod_attention_kernel)
    monkeypatch.setattr(pod, "pod_attention_kernel", recorder)
    assert captured_plan.splits == 2
    slots.launch(n, captured_plan, ws)  # the capture
    captured = recorder.launches[-1]
    recorder.run = False
    for contexts in ([700, 3, 512, 90, 1, 640], [600, 17, 1000], [9]):
        n = slots.write(contexts)
        slots.launch(n, on_32_sms(slots.plan, n, ws), ws)  # what the step launches unreplayed
        assert recorder.launches[-1].addresses() == captured.addresses()
        slots.poison(n)
        recorder.kernel[captured.grid](**captured.kwargs)  # the replay
        slots.check(n, tol=2e-5)
    assert not ws.counters.any() and not ws.merge.any()


@triton.jit
def _ticket_counters_kernel(smid_ptr, out_ptr, SM_SLOTS: tl.constexpr):
    i = tl.program_id(0)
    tl.store(out_ptr + i, pod._ticket_counter(tl.load(smid_ptr + i), SM_SLOTS))


def test_ticket_counters_stay_in_the_workspace_for_any_smid(monkeypatch):
    """%smid below %nsmid is all PTX promises: ids at and past the SM count (132, an
    H100's) must still land on a per-SM counter of the workspace, never past it."""
    monkeypatch.setattr(pod, "_num_sms", lambda device: 132)
    ws = Workspace(DEVICE, decode_groups=1, partial_rows=0, lse_rows=1, dim_p=64,
                   work_entries=0)
    constants, _ = pod.launch_constants(128, 16, 32, 8, torch.bfloat16, False, 132)
    smids = torch.tensor([0, 1, 131, 132, 200, 255, 256, 1000, 2 ** 20 + 7], dtype=torch.int32,
                         device=DEVICE)
    got = torch.empty_like(smids)
    _ticket_counters_kernel[(len(smids),)](smids, got, SM_SLOTS=constants["SM_SLOTS"])
    assert constants["SM_SLOTS"] == 256 and len(ws.counters) == constants["NUM_COUNTERS_P"]
    assert got.tolist() == [3 + s % 256 for s in smids.tolist()]
    assert 3 <= got.min() and got.max() < len(ws.counters)


def test_the_launcher_asks_for_one_build_per_model_over_random_batches(monkeypatch):
    """1,000 random batches (decodes, prefill chunks with and without earlier context;
    each dtype, head size, with and without KV sharding) through plan() and the launcher
    of a 132-SM GPU, in the served path (one workspace per model, sized once): every
    launch asks Triton for its model's one build, and the compile gate builds it."""
    from vllm_ext.kernels import compile_check as cc
    from vllm_ext.kernels.limits import leading_decodes

    gate = {c.key(): c for c in cc.configs()}
    monkeypatch.setattr(pod, "_num_sms", lambda device: 132)
    monkeypatch.setattr(pod, "_interpreted", lambda: False)  # bf16 dots as compiled
    recorder = Recorder(pod.pod_attention_kernel, run=False)
    monkeypatch.setattr(pod, "pod_attention_kernel", recorder)
    rng = random.Random(0)
    max_seqs, max_tokens, width = 260, 2400, 256
    models, asked, splits = {}, {}, set()
    for _ in range(1000):
        config = rng.choice(cc.configs())
        if config not in models:  # what an engine's builder and runner allocate once
            dtype, d = config.torch_dtype, config.head_dim
            kv = torch.empty(2, 8, 16, 2 * d, dtype=dtype)
            models[config] = (
                torch.empty(max_tokens, 32, d, dtype=dtype), *kv.transpose(1, 2).split(d, -1),
                torch.zeros(max_seqs, width, dtype=torch.int32),
                Workspace.for_batches("cpu", max_seqs, max_tokens, 32, 8, d,
                                      tile_for(d, dtype, config.sharded).block_m))
        query, key_cache, value_cache, table, ws = models[config]
        seqs = [(1, rng.randint(1, 4000)) for _ in range(rng.choice([0, 1, 5, 40, 250]))]
        for _ in range(rng.randint(0 if seqs else 1, 4)):
            chunk = rng.randint(1, 512)
            seqs.append((chunk, chunk + rng.choice([0, rng.randint(1, 3000)])))
        qsl = torch.tensor([0, *torch.tensor([q for q, _ in seqs]).cumsum(0).tolist()],
                           dtype=torch.int32)
        seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
        decodes = leading_decodes(qsl)
        shard = (2, rng.randint(0, 1), 16) if config.sharded else None
        p = plan(qsl, seq_lens, decodes, 32, 8, block_m=tile_for(
            config.head_dim, config.torch_dtype, config.sharded).block_m, workspace=ws)
        n = int(qsl[-1])
        pod_attention(query[:n], key_cache, value_cache, table[:len(seqs)], seq_lens, qsl,
                      decodes, 0.1, out=query[:n], pod_plan=p, kv_shard=shard, workspace=ws)
        key = cc.launch_key(recorder.launches.pop().kwargs)
        asked.setdefault(config, set()).add(key)
        splits.add(p.splits)
    assert all(len(keys) == 1 for keys in asked.values()), "a model asked for several builds"
    assert {k for keys in asked.values() for k in keys} <= gate.keys()
    assert all(gate[next(iter(keys))] == config for config, keys in asked.items())
    assert len(asked) == len(gate) and {1, 3, 16} <= splits  # every model; 1, 5 and 40 decodes


@pytest.mark.parametrize("change, says", [
    ({"head_dim": 48}, "head_dim 48"),
    ({"dtype": torch.float64}, "dtypes torch.float64"),
    ({"heads": 3, "kv_heads": 2}, "not a multiple of 2 KV heads"),
])
def test_unsupported_inputs_are_refused(change, says):
    dtype = change.pop("dtype", torch.float32)
    batch = make_batch([4], [(3, 3)], dtype=dtype, **change)
    with pytest.raises(ValueError, match=says):
        pod_attention(*batch, scale=0.1)


def test_decodes_must_come_first_with_one_token():
    batch = make_batch([], [(3, 3), (4, 4)])
    with pytest.raises(ValueError, match="exactly one query token"):
        pod_attention(*batch[:-1], num_decodes=1, scale=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llama3_8b_shapes_compiled():
    # Enough decodes to skip splitting, then few enough to split, on the real kernel.
    for decodes in ([1000, 4000, 33, 2048] * 8, [3000, 17]):
        check(make_batch(decodes, [(700, 2000), (64, 64)], heads=32, kv_heads=8, head_dim=128,
                         dtype=torch.bfloat16), dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_merges_hold_over_many_launches_compiled():
    """The last split to finish merges the others' partials: a missing barrier or
    release shows as an occasional wrong row, so launch many times, NaN-poisoned, on one
    workspace (its counters left zero by every launch)."""
    batch = make_batch([3000, 17, 900], [(300, 700)], heads=32, kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16)
    query, *_, num_decodes = batch
    want = reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in batch],
                                   scale=0.1).float()
    for splits in (None, 7):
        p = plan(batch[5], batch[4], num_decodes, 32, 8, block_m=tile_for(128, query.dtype).block_m,
                 decode_splits=splits)
        assert p.splits > 1
        ws = workspace_for(batch, splits)
        for _ in range(300):
            out = torch.full_like(query, float("nan"))
            pod_attention(*batch, scale=0.1, out=out, pod_plan=p, workspace=ws)
            torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launches_on_two_streams_with_a_workspace_each_compiled():
    a = make_batch([2000, 40], [(200, 500)], heads=32, kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=1)
    b = make_batch([64] * 40, [(900, 900)], heads=32, kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=2)
    want = [reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in x],
                                    scale=0.1).float() for x in (a, b)]
    workspaces = [workspace_for(x, splits=None) for x in (a, b)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(50):
        outs = []
        for x, ws, stream in zip((a, b), workspaces, streams):
            with torch.cuda.stream(stream):
                outs.append(pod_attention(*x, scale=0.1, workspace=ws))
        torch.cuda.synchronize()
        for out, w in zip(outs, want):
            torch.testing.assert_close(out.float().cpu(), w, atol=3e-2, rtol=3e-2)


def _builds() -> int:
    """The builds Triton holds for the POD kernel in this process (its in-memory cache:
    one entry per specialisation, on every device)."""
    return sum(len(caches[0]) for caches in pod.pod_attention_kernel.device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_graph_replays_batches_written_in_place_compiled():
    """A torch.cuda.CUDAGraph of one decode launch for 64 slots (Llama-3-8B attention,
    bf16), captured as vLLM captures (context 1), then replayed for random batches of 1
    to 64 decodes written into the same buffers: each planned into the builder's
    workspace as captured, each replay exact with its padding untouched, one build."""
    slots = DecodeSlots(64, 32, 8, 128, torch.bfloat16, width=128)
    ws = Workspace.for_batches(DEVICE, 64, 64, 32, 8, 128, block_m=64)
    n = slots.write([1] * 64)
    captured = slots.plan(n, ws)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds the kernel outside the capture
        slots.launch(n, captured, ws)
    torch.cuda.current_stream().wait_stream(side)
    builds = _builds()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slots.launch(n, captured, ws)
    rng = random.Random(0)
    for size in (64, 63, 17, 1, 40):
        n = slots.write([rng.randint(1, 128 * 16) for _ in range(size)])
        p = slots.plan(n, ws)
        assert (p.num_decode_tiles, p.splits, p.ratio, p.prefill_work.data_ptr()) == (
            captured.num_decode_tiles, captured.splits, captured.ratio,
            captured.prefill_work.data_ptr())
        slots.poison(n)
        graph.replay()
        torch.cuda.synchronize()
        slots.check(n, tol=3e-2)
    assert _builds() == builds and not ws.counters.any() and not ws.merge.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_serving_sweep_builds_the_kernel_once_compiled():
    """300 random steps of one model (Llama-3-8B attention, bf16: decodes, prefill chunks
    with and without context) through plan() and the launcher on one workspace and one
    KV cache, as an engine serves them: at most one build in all (none if an earlier
    test built it), every 50th step checked against the reference."""
    from vllm_ext.kernels.limits import leading_decodes

    rng = random.Random(1)
    pool, width = 4096, 256  # KV blocks of 16 tokens; a request's blocks drawn from the pool
    k_cache = torch.randn(pool, 16, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    v_cache = torch.randn(pool, 16, 8, 128, dtype=torch.bfloat16, device=DEVICE)
    ws = Workspace.for_batches(DEVICE, 256, 2048, 32, 8, 128, block_m=64)
    before = _builds()
    for step in range(300):
        seqs = [(1, rng.randint(1, 4000)) for _ in range(rng.choice([0, 1, 7, 60, 200]))]
        seqs += [(q, q + rng.choice([0, 500])) for q in
                 (rng.randint(1, 512) for _ in range(rng.randint(0 if seqs else 1, 3)))]
        qsl = torch.tensor([0, *torch.tensor([q for q, _ in seqs]).cumsum(0).tolist()],
                           dtype=torch.int32)
        seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32, device=DEVICE)
        table = torch.randint(1, pool, (len(seqs), width), dtype=torch.int32, device=DEVICE)
        query = torch.randn(int(qsl[-1]), 32, 128, dtype=torch.bfloat16, device=DEVICE)
        num_decodes = leading_decodes(qsl)
        p = plan(qsl, seq_lens, num_decodes, 32, 8, device=DEVICE, workspace=ws)
        args = (query, k_cache, v_cache, table, seq_lens, qsl.to(DEVICE), num_decodes, 0.1)
        out = pod_attention(*args, pod_plan=p, workspace=ws)
        if step % 50 == 0:
            want = reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in args])
            torch.testing.assert_close(out.float().cpu(), want.float(), atol=3e-2, rtol=3e-2)
    assert _builds() - before <= 1
