"""The CUDA backend of VirtualKVPool (CUDA VMM through cuda-python). Needs a GPU, torch
with CUDA and cuda-python; not vLLM.

Also checks what the stand-in driver of tests/test_cuda_backend_logic.py cannot: that
torch takes the pool's tensor over a reservation from the first call, and that asking
for more physical memory than the device has keeps what the device gave."""

from __future__ import annotations

import pytest
import torch

from vllm_ext.allocators import KVPoolError, PhysicalMemoryError, VirtualKVPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
MIB = 1 << 20


@pytest.fixture
def pool():
    pytest.importorskip("cuda.bindings.driver")
    p = VirtualKVPool(4, 64 * 2 * MIB, backend="cuda", keep_handles=8)
    yield p
    torch.cuda.synchronize()
    p.close()


def _free_device_bytes() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_device_memory_follows_mapped_pages(pool):
    assert pool.page_size % pool.backend.granularity == 0
    before = _free_device_bytes()
    pool.map(range(1, 17))  # 16 pages x 4 layers x 2 MiB = 128 MiB, beside page 0
    used = before - _free_device_bytes()
    assert pool.mapped_bytes == 17 * 4 * pool.page_size
    assert 0.95 * 16 * 4 * pool.page_size <= used <= pool.mapped_bytes + 64 * MIB
    pool.unmap(range(8)).result()
    pool.trim()
    assert before - _free_device_bytes() <= pool.mapped_bytes + 64 * MIB


def test_tensors_are_the_reserved_range_without_copies(pool):
    pool.map([1])
    layer = pool.layer(2)
    assert layer.is_cuda and layer.data_ptr() == pool._base + 2 * pool.region_bytes
    layer[: 2 * pool.page_size].fill_(3)
    assert int(pool.buffer[2 * pool.region_bytes]) == 3


def test_data_survives_other_pages_and_reused_handles(pool):
    pool.map([5])
    values = torch.arange(pool.page_size // 4, device="cuda", dtype=torch.int32)
    view = pool.layer(1)[5 * pool.page_size:6 * pool.page_size].view(torch.int32)
    view.copy_(values)
    for _ in range(3):  # kept handles go around between other pages
        pool.map([6, 7])
        pool.layer(1)[6 * pool.page_size:8 * pool.page_size].fill_(-1)
        pool.unmap([6, 7], fence=pool.backend.fence()).result()
    assert torch.equal(view, values)


def test_background_maps_and_errors(pool):
    pool.map_async(range(10, 20))
    pool.wait(range(10, 20))
    pool.layer(0)[10 * pool.page_size:20 * pool.page_size].zero_()
    with pytest.raises(KVPoolError, match="already mapped"):
        pool.map([10])
    pool.unmap([10]).result()
    with pytest.raises(KVPoolError, match="double unmap"):
        pool.unmap([10])


def test_attention_over_pool_tensors_equals_a_plain_allocation(pool):
    from vllm_ext.kernels import pod_attention

    blocks, block, kv_heads, head = 256, 16, 8, 128
    nbytes = blocks * block * kv_heads * head * 2
    kv = VirtualKVPool(2, nbytes, backend="cuda")
    try:
        kv.map(range(1, kv.num_pages))  # page 0 is mapped with the pool
        shape = (blocks, block, kv_heads, head)
        k, v = (kv.layer(i).view(torch.bfloat16).view(shape) for i in range(2))
        k.normal_(), v.normal_()
        table = torch.randperm(blocks, device="cuda", dtype=torch.int32)[:8 * 32].view(8, 32)
        q = torch.randn(8, 32, head, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((8,), 500, device="cuda", dtype=torch.int32)
        qsl = torch.arange(9, device="cuda", dtype=torch.int32)
        args = (table.contiguous(), lens, qsl)
        a = pod_attention(q, k, v, *args, num_decodes=8, scale=head ** -0.5)
        b = pod_attention(q, k.clone(), v.clone(), *args, num_decodes=8, scale=head ** -0.5)
        assert torch.equal(a, b)
        del k, v
        torch.cuda.synchronize()
    finally:
        kv.close()


def test_the_pool_tensor_works_from_the_first_call():
    pytest.importorskip("cuda.bindings.driver")
    torch.cuda.synchronize()
    with VirtualKVPool(2, 8 * 2 * MIB, backend="cuda") as fresh:  # nothing mapped by hand
        layer = fresh.layer(1)
        assert layer.device == torch.device("cuda", torch.cuda.current_device())
        assert not layer[: fresh.page_size].any()  # page 0: mapped and cleared
        layer[: fresh.page_size].fill_(7)
        assert int(layer[fresh.page_size - 1]) == 7
        del layer
        torch.cuda.synchronize()


def test_more_physical_memory_than_the_device_has_keeps_what_it_got():
    pytest.importorskip("cuda.bindings.driver")
    free = _free_device_bytes()
    layers = 2
    layer_bytes = (free // layers // (2 * MIB) + 64) * 2 * MIB  # 128 pages more than is free
    with VirtualKVPool(layers, layer_bytes, backend="cuda", physical_pages=1 << 30) as big:
        got = big.physical_pages
        # Every page the device had (give or take what the driver keeps for itself).
        assert got < big.num_pages and got * layers * big.page_size >= 0.9 * free
        assert big.stats().provisioned_bytes == got * layers * big.page_size
        assert _free_device_bytes() < free - 0.9 * got * layers * big.page_size
        big.map(range(1, got))  # all of them map, from what was set aside
        big.layer(1)[(got - 1) * big.page_size:got * big.page_size].fill_(1)
        torch.cuda.synchronize()
        with pytest.raises(PhysicalMemoryError, match="cuMemCreate"):
            big.map([got])  # one more than the device gave: refused, nothing changes
        assert big.mapped_pages == got
        big.unmap(range(1, got), fence=big.backend.fence()).result()
        assert big.trim() == 0  # set aside for the pool's life
    assert _free_device_bytes() >= free - 64 * MIB  # and given back with it
