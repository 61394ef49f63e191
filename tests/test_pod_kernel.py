"""POD-Attention kernel against the PyTorch reference: output and LSE over hybrid
batches of awkward shapes. On a CPU the kernel runs under Triton's interpreter; with
CUDA the same cases run compiled."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is decorated

from vllm_ext.kernels import pod_attention, reference  # noqa: E402
from vllm_ext.kernels.pod import plan, tile_for  # noqa: E402

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


def check(batch, dtype=torch.float32, splits=None, scale=0.1):
    query, *_, num_decodes = batch
    p = plan(batch[5], batch[4], num_decodes, query.shape[1], batch[1].shape[2],
             block_m=tile_for(query.shape[2], query.dtype).block_m, decode_splits=splits)
    out = torch.full_like(query, float("nan"))  # unwritten outputs show as NaN
    got, lse = pod_attention(*batch, scale=scale, out=out, return_lse=True, pod_plan=p)
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


def test_repeated_launches_reuse_their_counters():
    batch = make_batch([20, 33], [(14, 30)])
    for splits in (3, 3, 1, 2):
        check(batch, splits=splits)


def test_launches_allocate_no_scratch_and_reuse_it():
    from vllm_ext.kernels.pod import _Workspace

    batch = make_batch([20, 33], [(14, 30)])
    check(batch, splits=3)
    ws = _Workspace.get(batch[0].device)
    before = {name: buf.data_ptr() for name, buf in ws._buffers.items()}
    check(batch, splits=3)
    assert {"counters", "merge", "part_o", "part_lse"} <= set(before)
    assert {name: buf.data_ptr() for name, buf in ws._buffers.items()} == before


def test_a_launch_that_raised_does_not_poison_the_next(monkeypatch):
    from vllm_ext.kernels import pod

    batch = make_batch([20, 33], [(14, 30)])
    check(batch, splits=2)

    class Aborted(RuntimeError):
        pass

    class HalfLaunch:
        # Takes tiles and counts finished programs, as a launch cut short would.
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[12][:3] += 1  # counters
                args[11][:1] += 1  # a merge counter
                raise Aborted
            return launch

    monkeypatch.setattr(pod, "pod_attention_kernel", HalfLaunch())
    with pytest.raises(Aborted):
        pod_attention(*batch, scale=0.1, pod_plan=plan(batch[5], batch[4], batch[6], 4, 2,
                                                       decode_splits=2))
    monkeypatch.undo()
    check(batch, splits=2)


def test_plan_from_host_metadata_puts_the_work_list_on_the_kernels_device():
    batch = make_batch([5, 9], [(20, 20)])
    p = plan(batch[5].cpu(), batch[4].cpu(), 2, 4, 2, block_m=64, device=DEVICE)
    assert p.prefill_work.device.type == torch.device(DEVICE).type
    assert p.prefill_work.tolist() == [[2, 0]] and p.num_prefill_tiles == 4


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
    release shows as an occasional wrong row, so launch many times, NaN-poisoned."""
    batch = make_batch([3000, 17, 900], [(300, 700)], heads=32, kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16)
    query, *_, num_decodes = batch
    want = reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in batch],
                                   scale=0.1).float()
    for splits in (None, 7):
        p = plan(batch[5], batch[4], num_decodes, 32, 8, block_m=tile_for(128, query.dtype).block_m,
                 decode_splits=splits)
        assert p.splits > 1
        for _ in range(300):
            out = torch.full_like(query, float("nan"))
            pod_attention(*batch, scale=0.1, out=out, pod_plan=p)
            torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launches_on_two_streams_do_not_share_counters_compiled():
    a = make_batch([2000, 40], [(200, 500)], heads=32, kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=1)
    b = make_batch([64] * 40, [(900, 900)], heads=32, kv_heads=8, head_dim=128,
                   dtype=torch.bfloat16, seed=2)
    want = [reference.pod_attention(*[t.cpu() if torch.is_tensor(t) else t for t in x],
                                    scale=0.1).float() for x in (a, b)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()
    for _ in range(50):
        outs = []
        for x, stream in zip((a, b), streams):
            with torch.cuda.stream(stream):
                outs.append(pod_attention(*x, scale=0.1))
        torch.cuda.synchronize()
        for out, w in zip(outs, want):
            torch.testing.assert_close(out.float().cpu(), w, atol=3e-2, rtol=3e-2)
