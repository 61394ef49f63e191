"""`--attn pod`'s CUDA backend (vllm_ext.engine.pod.cuda) on CPU tensors, against vLLM's own
classes: its CommonAttentionMetadata, its Triton-layout KV cache written by its own
writer (`triton_reshape_and_cache_flash`), its CUDA platform's backend selection. The
POD kernel and vLLM's writer run under Triton's interpreter.

Runs in tests/test_vllm_releases.py's runs, once per vLLM release (0.32 installed, and
0.33 and 0.34 from their wheels' sources), where vLLM is told Triton is there.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.release, pytest.mark.vllm_triton]


@pytest.fixture(autouse=True)
def _vllm_triton(monkeypatch):
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        pytest.skip("vLLM's Triton code on CPU tensors runs in tests/test_vllm_releases.py")
    # vLLM's KV writer picks its tile by the GPU's generation: an H100's, here.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


BLOCK = 16
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
# name: (query heads, KV heads, head size)
SHAPES = {"gqa4-d128": (8, 2, 128), "mha-d64": (4, 4, 64), "gqa2-d256": (4, 2, 256)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    from vllm_ext.tools.driver import engine_config
    from vllm_ext.tools.models import make_shape

    model = make_shape(tmp_path_factory.mktemp("model"), "tiny")
    made = {}

    def get(heads, kv_heads, head_dim, impl="triton"):
        key = (heads, kv_heads, head_dim, impl)
        if key not in made:
            made[key] = engine_config(
                model, attn="pod", pod_impl=impl, block_size=BLOCK, max_model_len=1024,
                dtype="float32", hf_overrides={
                    "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                    "head_dim": head_dim, "hidden_size": heads * head_dim})
        return made[key]

    return get


def _backend(config, dtype):
    from vllm.config import set_current_vllm_config
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_ext.engine.pod.cuda import PodCudaBackend

    model, parallel = config.model_config, config.parallel_config
    heads, kv_heads = model.get_num_attention_heads(parallel), model.get_num_kv_heads(parallel)
    head_dim = model.get_head_size()
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=kv_heads, head_size=head_dim,
                             dtype=dtype)
    builder = PodCudaBackend.get_builder_cls()(spec, ["model.layers.0.self_attn.attn"], config,
                                               torch.device("cpu"))
    with set_current_vllm_config(config):
        impl = PodCudaBackend.get_impl_cls()(heads, head_dim, head_dim ** -0.5, kv_heads, None,
                                             None, "auto")
    return builder, impl


def _step(config, seqs, dtype=torch.float32, padding=0, seed=0):
    """One engine step of `seqs` ((query tokens, context incl. them), decodes first) through
    the backend: the earlier context written in an earlier step, this step's tokens now,
    both by vLLM's writer, into a NaN-filled cache with scattered blocks. Returns the
    step's output and exact attention computed from the whole K/V, never from the cache."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    builder, impl = _backend(config, dtype)
    heads, kv_heads, d = impl.num_heads, impl.num_kv_heads, impl.head_size
    g = torch.Generator().manual_seed(seed)
    need = [math.ceil(c / BLOCK) for _, c in seqs]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seqs), max(need), dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        table[s, :n] = perm[used:used + n]
        used += n
    kv_cache = torch.full((num_blocks, kv_heads, BLOCK, 2 * d), float("nan"), dtype=dtype)
    layer = SimpleNamespace(_k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0))
    keys = [torch.randn(c, kv_heads, d, generator=g).to(dtype) for _, c in seqs]
    values = [torch.randn(c, kv_heads, d, generator=g).to(dtype) for _, c in seqs]

    def slots(s, positions):
        pos = torch.tensor(list(positions), dtype=torch.long)
        return (table[s].long()[pos // BLOCK] * BLOCK + pos % BLOCK)

    earlier = [(s, range(c - q)) for s, (q, c) in enumerate(seqs) if c > q]
    if earlier:
        impl.do_kv_cache_update(layer, torch.cat([keys[s][p] for s, p in earlier]),
                                torch.cat([values[s][p] for s, p in earlier]), kv_cache,
                                torch.cat([slots(s, p) for s, p in earlier]))
    now = [range(c - q, c) for q, c in seqs]
    num_tokens = sum(q for q, _ in seqs)
    pad = lambda t: torch.cat([t, torch.zeros(padding, *t.shape[1:], dtype=t.dtype)])
    slot_mapping = torch.cat([slots(s, p) for s, p in enumerate(now)]
                             + [torch.full((padding,), -1, dtype=torch.long)])
    key = pad(torch.cat([keys[s][p] for s, p in enumerate(now)]))
    value = pad(torch.cat([values[s][p] for s, p in enumerate(now)]))
    impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)

    query = torch.randn(num_tokens + padding, heads, d, generator=g).to(dtype)
    qsl = torch.tensor([0] + [q for q, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    cam = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(seqs),
        num_actual_tokens=num_tokens, max_query_len=max(q for q, _ in seqs),
        max_seq_len=int(seq_lens.max()), block_table_tensor=table,
        slot_mapping=slot_mapping.to(torch.int64), seq_lens_cpu_upper_bound=seq_lens)
    md = builder.build(0, cam)
    output = torch.full((num_tokens + padding, heads, d), float("nan"), dtype=dtype)
    impl.forward(layer, query, key, value, kv_cache, md, output)

    return output, _exact_attention(seqs, query, qsl, keys, values), md


def _exact_attention(seqs, query, qsl, keys, values) -> torch.Tensor:
    """Causal attention of each sequence's queries over its whole K/V, in float64."""
    want = []
    for s, (q, c) in enumerate(seqs):
        qs = query[int(qsl[s]):int(qsl[s + 1])].double()
        group = qs.shape[1] // keys[s].shape[1]
        k = keys[s].double().repeat_interleave(group, dim=1)
        v = values[s].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qs, k) * qs.shape[2] ** -0.5
        visible = torch.arange(c)[None, :] <= torch.arange(c - q, c)[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        want.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(want)


MIXED = [(1, 5), (1, 40), (1, 33), (20, 20), (10, 50)]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixed_batch_is_exact(configs, shape):
    out, want, md = _step(configs(*SHAPES[shape]), MIXED)
    assert md.num_decodes == 3 and md.plan.num_decode_tiles > 0 and md.plan.num_prefill_tiles > 0
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("seqs", [
    pytest.param([(1, 17), (1, 64), (1, 100)], id="decodes-only"),
    pytest.param([(37, 37), (5, 5)], id="prefills-only"),
    pytest.param([(1, 9), (24, 131), (1, 1)], id="context-then-a-late-one-token-prompt"),
])
def test_batch_mixes(configs, seqs):
    out, want, _ = _step(configs(8, 2, 128), seqs)
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_cuda_graph_padding_rows_are_left_alone(configs):
    out, want, _ = _step(configs(8, 2, 128), MIXED, padding=5)
    n = want.shape[0]
    torch.testing.assert_close(out[:n].double(), want, atol=TOL[torch.float32],
                               rtol=TOL[torch.float32])
    assert torch.isnan(out[n:]).all()  # padded tokens: no writes, no reads


def test_bf16(configs):
    out, want, _ = _step(configs(8, 2, 128), MIXED, dtype=torch.bfloat16)
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.bfloat16],
                               rtol=TOL[torch.bfloat16])


def test_the_torch_impl_agrees(configs):
    out, want, md = _step(configs(8, 2, 128, impl="torch"), MIXED)
    assert md.plan is None
    torch.testing.assert_close(out.double(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])


def test_the_plan_reads_only_host_metadata(configs):
    """The builder never reads the device copies: here they are poisoned."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    builder, _ = _backend(configs(8, 2, 128), torch.float32)
    qsl = torch.tensor([0, 1, 2, 12], dtype=torch.int32)
    seq_lens = torch.tensor([30, 300, 40], dtype=torch.int32)
    poisoned = object()  # any use but passing it on fails
    cam = CommonAttentionMetadata(
        query_start_loc=poisoned, query_start_loc_cpu=qsl,
        seq_lens=torch.empty(3, dtype=torch.int32, device="meta"),  # any read of it fails
        num_reqs=3,
        num_actual_tokens=12, max_query_len=10, max_seq_len=300,
        block_table_tensor=torch.zeros(3, 20, dtype=torch.int32), slot_mapping=poisoned,
        seq_lens_cpu_upper_bound=seq_lens)
    md = builder.build(0, cam)
    assert md.num_decodes == 2 and md.plan.num_prefill_tiles == 8  # one 64-row tile x 8 heads


def test_full_cuda_graphs_of_decode_steps_are_declared(configs):
    from vllm.v1.attention.backend import AttentionCGSupport

    from vllm_ext.engine.pod.cuda import PodCudaBackend

    builder = PodCudaBackend.get_builder_cls()
    support = {i: builder.get_cudagraph_support(configs(8, 2, 128, impl=i), None)
               for i in ("triton", "torch")}
    assert support == {"triton": AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE,
                       "torch": AttentionCGSupport.NEVER}


class _Runner:
    """A model runner's persistent metadata for decode steps of `slots` requests, written
    in place each step as vLLM's runners write a full-graph step padded to a captured
    size: padding requests have no query token (query_start_loc repeats the last real
    entry), context 0 and the null block, block 0 (NaN here: never to be read)."""

    def __init__(self, slots, heads, kv_heads, d, width=48):
        g = torch.Generator().manual_seed(0)
        self.slots, self.width, self.g = slots, width, g
        self.kv_cache = torch.randn(1 + slots * width, kv_heads, BLOCK, 2 * d, generator=g)
        self.kv_cache[0] = float("nan")
        self.query = torch.empty(slots, heads, d)
        self.outputs = torch.empty(slots + 2, heads, d)  # two rows past the output
        self.qsl = torch.zeros(slots + 1, dtype=torch.int32)
        self.seq_lens = torch.zeros(slots, dtype=torch.int32)
        self.table = torch.zeros(slots, width, dtype=torch.int32)

    def step(self, contexts):
        """Write a step's metadata; its CommonAttentionMetadata, padded to the slots."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        n = len(contexts)
        self.query.copy_(torch.randn(self.query.shape, generator=self.g))
        self.query[n:] = float("nan")
        self.qsl.copy_(torch.tensor([min(i, n) for i in range(self.slots + 1)]))
        self.seq_lens.copy_(torch.tensor(contexts + [0] * (self.slots - n)))
        self.table.zero_()
        self.table[:n] = (1 + torch.randperm(self.slots * self.width, generator=self.g)
                          [:n * self.width]).view(n, self.width)
        return n, CommonAttentionMetadata(
            query_start_loc=self.qsl, query_start_loc_cpu=self.qsl.clone(),
            seq_lens=self.seq_lens, num_reqs=self.slots, num_actual_tokens=self.slots,
            max_query_len=1, max_seq_len=max(contexts), block_table_tensor=self.table,
            slot_mapping=torch.full((self.slots,), -1, dtype=torch.int64),
            seq_lens_cpu_upper_bound=self.seq_lens.clone())


def test_decode_graphs_replay_from_the_builders_buffers(configs, monkeypatch):
    """A full CUDA graph of a decode step, on CPU tensors: the launch captured from the
    builder's capture metadata (4 decodes of context 1, as vLLM captures) is run again,
    the same tensors and scalars, after each new step of up to 4 decodes is written in
    place and built: every build asks for the captured launch (as on a 16-SM GPU, where
    4 decodes x 2 KV heads split 2 ways), and each replay is exact for the real requests,
    leaving the padding rows and what lies past the output alone."""
    from vllm_ext.kernels import pod
    from vllm_ext.kernels import reference as ref

    config = configs(8, 2, 128)
    with monkeypatch.context() as m:  # the builder's side, as for a 16-SM GPU
        m.setattr(pod, "_num_sms", lambda device: 16)
        builder, impl = _backend(config, torch.float32)
    runner = _Runner(4, impl.num_heads, impl.num_kv_heads, impl.head_size)
    launches = []
    kernel = pod.pod_attention_kernel

    class Recorder:
        def __getitem__(self, grid):
            def launch(**kwargs):
                launches.append((grid, kwargs))
                if len(launches) == 1:  # the capture runs; later launches are replays
                    kernel[grid](**kwargs)
            return launch

    monkeypatch.setattr(pod, "pod_attention_kernel", Recorder())
    layer = SimpleNamespace(_k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0))

    def forward(cam):
        with monkeypatch.context() as m:
            m.setattr(pod, "_num_sms", lambda device: 16)
            md = (builder.build(0, cam) if launches else builder.build_for_cudagraph_capture(cam))
        impl.forward(layer, runner.query, None, None, runner.kv_cache, md, runner.outputs[:4])
        grid, kwargs = launches[-1]
        return md, (grid, [(k, v.data_ptr() if torch.is_tensor(v) else v)
                           for k, v in kwargs.items()])

    captured_md, captured = forward(runner.step([1] * 4)[1])
    assert captured_md.plan.splits == 2
    key_cache, value_cache = runner.kv_cache.transpose(1, 2).split(impl.head_size, dim=-1)
    for contexts in ([600, 3, 530, 90], [17, 700], [5]):
        n, cam = runner.step(contexts)
        md, launch = forward(cam)
        assert launch == captured and md.workspace is captured_md.workspace
        runner.outputs[:n], runner.outputs[n:] = float("nan"), -7.0
        kernel[launches[0][0]](**launches[0][1])  # the replay
        want = ref.pod_attention(runner.query[:n], key_cache, value_cache, runner.table[:n],
                                 runner.seq_lens[:n], runner.qsl[:n + 1], n, impl.scale)
        torch.testing.assert_close(runner.outputs[:n], want, atol=TOL[torch.float32],
                                   rtol=TOL[torch.float32])
        assert (runner.outputs[n:] == -7.0).all()


def test_a_step_with_prefills_is_never_captured(configs):
    builder, _ = _backend(configs(8, 2, 128), torch.float32)
    runner = _Runner(3, 8, 2, 128)
    _, cam = runner.step([5, 9, 1])
    cam.query_start_loc_cpu = torch.tensor([0, 1, 2, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="decode-only steps in full CUDA graphs"):
        builder.build_for_cudagraph_capture(cam)


def test_microbatching_is_refused(configs, monkeypatch):
    from vllm.config import ParallelConfig

    monkeypatch.setattr(ParallelConfig, "use_ubatching", property(lambda self: True))
    with pytest.raises(ValueError, match="does not run with microbatching"):
        _backend(configs(8, 2, 128), torch.float32)


def _reasons(monkeypatch, **config):
    """What vLLM's CUDA platform asks a selected backend (platforms/cuda.py, which needs
    vLLM's compiled ops to import): its selector config and the device's capability,
    here an H100's. Any reason refuses the backend, as a hard error."""
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import registry
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_ext.engine.pod.backends import BACKEND_PATHS

    custom = registry.AttentionBackendEnum.CUSTOM
    monkeypatch.setitem(registry._ATTN_OVERRIDES, custom, BACKEND_PATHS["cuda"])  # as on CUDA
    backend = custom.get_class()
    selector = AttentionSelectorConfig(**{"head_size": 128, "dtype": torch.bfloat16,
                                          "kv_cache_dtype": "auto", "block_size": 16, **config})
    return backend, backend.validate_configuration(device_capability=DeviceCapability(9, 0),
                                                   **selector._asdict())


def test_vllm_finds_it_valid_on_cuda_with_and_without_kvp(monkeypatch):
    from vllm_ext.engine.pod.cuda import PodCudaBackend

    backend, reasons = _reasons(monkeypatch)
    assert backend is PodCudaBackend and reasons == []
    assert _reasons(monkeypatch, use_dcp=True)[1] == []


@pytest.mark.parametrize("config, says", [
    ({"head_size": 72}, "head size 72 (supported: [64, 80, 96, 128, 256])"),
    ({"kv_cache_dtype": "fp8"}, "KV cache dtype fp8 (supported: auto, float16, bfloat16"),
    ({"has_sink": True}, "attention sinks (not supported)"),
    ({"has_sliding_window": True}, "sliding windows (not supported)"),
    ({"use_pcp": True}, "prefill context parallelism (not supported)"),
    ({"kv_cache_dtype": "float16"}, ("KV cache dtype float16 with a bfloat16 model (supported: "
                                     "the model's own dtype, or auto)")),
    ({"attn_type": "encoder_only"}, "encoder_only attention (supported: decoder)"),
])
def test_vllm_is_told_what_it_cannot_run_and_what_it_can(monkeypatch, config, says):
    _, reasons = _reasons(monkeypatch, **config)
    assert len(reasons) == 1 and says in reasons[0], reasons
    assert "--attn pod does not support" in reasons[0] and "use --attn vllm" in reasons[0]


class _Group:
    """vLLM's DCP group for ranks run as threads of this process, one at a time: a rank
    computes only while it holds the turn, and gives it up at each collective until
    every rank has brought its part (so Triton's interpreter never runs two kernels at
    once)."""

    def __init__(self, world: int) -> None:
        import threading

        self.world_size, self.turn = world, threading.Lock()
        self.barrier, self.parts = threading.Barrier(world), [None] * world

    def member(self, rank: int):
        group = self

        class Member:
            world_size, rank_in_group = group.world_size, rank

            def _exchange(self, t):
                group.parts[rank] = t
                group.turn.release()
                group.barrier.wait()
                parts = list(group.parts)
                group.barrier.wait()
                group.turn.acquire()
                return parts

            def all_gather(self, t, dim=-1):
                return torch.cat(self._exchange(t), dim=dim)

            def reduce_scatter(self, t, dim=-1):
                total = torch.stack(self._exchange(t)).sum(0)
                return total.chunk(group.world_size, dim=dim)[rank].contiguous()

        return Member()


def _interpretable_dcp_kernel(monkeypatch) -> None:
    """vLLM's DCP merge launcher counts the compiled kernel's `constexprs`, which the
    interpreter's kernel object does not list: give it the same list."""
    import inspect

    from vllm.v1.attention.ops import dcp

    kernel = dcp._CORRECT_ATTN_CP_OUT_KERNEL.kernel
    if not hasattr(kernel, "constexprs"):
        params = inspect.signature(kernel.fn).parameters.values()
        monkeypatch.setattr(kernel, "constexprs", [
            i for i, p in enumerate(params) if "constexpr" in str(p.annotation)], raising=False)


@pytest.mark.parametrize("interleave, impl", [(1, "triton"), (16, "triton"), (16, "torch")])
def test_kvp_ranks_merged_by_vllms_collective_are_exact(tmp_path, monkeypatch, interleave, impl):
    """--kvp 2 on CUDA, on CPU tensors: each rank's cache holds its share of every
    request's KV (vLLM's DCP layout, written by vLLM's writer), each rank attends the
    group's heads over it, and vLLM's cp_lse_ag_out_rs merges: every rank's heads equal
    attention over the whole KV."""
    import threading

    from vllm.distributed import parallel_state
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from vllm_ext.kernels.kvp import slot_mapping
    from vllm_ext.tools.driver import engine_config
    from vllm_ext.tools.models import make_shape

    _interpretable_dcp_kernel(monkeypatch)
    ranks, heads, d = 2, 8, 64
    config = engine_config(make_shape(tmp_path / "m", "tiny"), attn="pod", kvp=ranks,
                           pod_impl=impl, cp_kv_cache_interleave_size=interleave, block_size=BLOCK,
                           max_model_len=1024, dtype="float32", hf_overrides={
                               "num_attention_heads": heads, "num_key_value_heads": 1,
                               "head_dim": d, "hidden_size": heads * d})
    seqs = MIXED
    g = torch.Generator().manual_seed(interleave)
    keys = [torch.randn(c, 1, d, generator=g) for _, c in seqs]
    values = [torch.randn(c, 1, d, generator=g) for _, c in seqs]
    virtual = BLOCK * ranks
    need = [math.ceil(c / virtual) for _, c in seqs]
    table = torch.arange(1, 1 + sum(need) * 2, dtype=torch.int32)[torch.randperm(
        sum(need) * 2, generator=g)][:len(seqs) * max(need)].view(len(seqs), max(need))
    qsl = torch.tensor([0] + [q for q, _ in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), heads, d, generator=g)
    layer = SimpleNamespace(_k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0))
    group, outs, errors = _Group(ranks), {}, []
    local = threading.local()
    monkeypatch.setattr(parallel_state, "get_dcp_group", lambda: local.member)

    def rank_main(rank):
        local.member = group.member(rank)
        group.turn.acquire()
        try:
            builder, impl = _backend(config, torch.float32)
            impl.dcp_world_size, impl.dcp_rank = ranks, rank
            assert impl.num_heads == heads // ranks and builder.num_heads == heads
            cache = torch.full((int(table.max()) + 1, 1, BLOCK, 2 * d), float("nan"))
            for s, (q, c) in enumerate(seqs):  # the past, then this step's tokens
                for part in (range(c - q), range(c - q, c)):
                    pos = torch.tensor(list(part), dtype=torch.long)
                    slots = slot_mapping(pos, torch.full_like(pos, s), table, BLOCK, ranks, rank,
                                         interleave)
                    impl.do_kv_cache_update(layer, keys[s][pos], values[s][pos], cache, slots)
            cam = CommonAttentionMetadata(
                query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
                num_reqs=len(seqs), num_actual_tokens=int(qsl[-1]),
                max_query_len=max(q for q, _ in seqs), max_seq_len=int(seq_lens.max()),
                block_table_tensor=table, slot_mapping=torch.zeros(int(qsl[-1]), dtype=torch.long),
                seq_lens_cpu_upper_bound=seq_lens)
            md = builder.build(0, cam)
            mine = query[:, rank * impl.num_heads:(rank + 1) * impl.num_heads].contiguous()
            out = torch.full_like(mine, float("nan"))
            impl.forward(layer, mine, None, None, cache, md, out)
            outs[rank] = out
        except BaseException as e:  # noqa: BLE001 (reported below, from the test's thread)
            errors.append(e)
            group.barrier.abort()
        finally:
            group.turn.release()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    want = _exact_attention(seqs, query, qsl, keys, values)
    got = torch.cat([outs[r] for r in range(ranks)], dim=1)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
