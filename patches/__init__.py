"""Every change vllm-ext makes to vLLM outside a supported hook, listed in one place.

| patch      | target                                          | vLLM     | why                                   |
|------------|-------------------------------------------------|----------|---------------------------------------|
| cli_flags  | vllm.engine.arg_utils:EngineArgs.add_cli_args   | 0.32.x   | `--scheduler`/`--attn`/`--kv-allocator` and component options on every engine CLI |
| kv_pool_alloc | vllm.v1.worker.gpu_model_runner:allocate_kv_cache | 0.32.x | vattention: the worker's KV memory in a VirtualKVPool |
| paged_block_pool | vllm.v1.core.kv_cache_manager:get_kv_cache_coordinator | 0.32.x | vattention: page-aware choice of free blocks, physical cap |
| page_ops_schedule | vllm.v1.core.sched.scheduler:Scheduler.schedule | 0.32.x | vattention: each step's page orders attached to the SchedulerOutput |
| page_ops_worker | vllm.v1.worker.gpu_worker:Worker.execute_model | 0.32.x | vattention: the worker carries out those orders before the step |
| slot_owner | vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots | 0.32.x | vattention slots layout: the block pool knows which request it allocates for |
| pp_eager_buffers | vllm.v1.worker.gpu_model_runner:GPUModelRunner.sync_and_gather_intermediate_tensors | 0.32.x | pipeline parallelism on CPU with --enforce-eager: the later stages' activation buffer, which vLLM allocates only when compiling (only with a vllm-ext component selected) |

pp_eager_buffers is applied on vLLM's CPU platform only. The vattention patches are
applied only in processes where `--kv-allocator vattention` was chosen (VLLMEXT_KV_POOL
set); their wrappers check it again and run vLLM's original code otherwise.
"""

from __future__ import annotations

from packaging.version import Version

from vllm_ext.patches.base import Patch, PatchError
from vllm_ext.patches.cli_flags import CliFlags
from vllm_ext.patches.kv_pool_alloc import KVPoolAlloc
from vllm_ext.patches.page_ops_schedule import PageOpsSchedule
from vllm_ext.patches.page_ops_worker import PageOpsWorker
from vllm_ext.patches.paged_block_pool import PagedBlockPoolPatch
from vllm_ext.patches.pp_eager_buffers import PPEagerBuffers
from vllm_ext.patches.slot_owner import SlotOwner

PATCHES: tuple[Patch, ...] = (CliFlags(),)
CPU_PATCHES: tuple[Patch, ...] = (PPEagerBuffers(),)
VATTENTION_PATCHES: tuple[Patch, ...] = (KVPoolAlloc(), PagedBlockPoolPatch(), PageOpsSchedule(),
                                         PageOpsWorker(), SlotOwner())

__all__ = ["CPU_PATCHES", "PATCHES", "VATTENTION_PATCHES", "Patch", "PatchError", "apply_all"]


def apply_all(vllm_version: Version) -> None:
    from vllm_ext import envs

    from vllm.platforms import current_platform

    wanted = PATCHES + (CPU_PATCHES if current_platform.device_type == "cpu" else ()) \
        + (VATTENTION_PATCHES if envs.kv_pool_selected() else ())
    for patch in wanted:
        patch.apply(vllm_version)
