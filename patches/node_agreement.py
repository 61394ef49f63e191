"""Patch: the nodes of a multi-node engine agree on vllm-ext before their workers run.

In vLLM's multiprocessing multi-node mode (`--nnodes N --node-rank R`) every node builds
its engine config from its own command line and makes its workers from it; only the
scheduler's output crosses from node 0. A node given other vllm-ext flags, or none, or
another vllm-ext release, runs its workers otherwise: seen here, a pipeline stage that
fails its first step, or attention backends silently mixed across tensor-parallel ranks
(docs/distributed.md). Nothing in vLLM compares the nodes' configs.

So once `WorkerWrapperBase.init_device` has brought up vLLM's distributed environment,
each worker of a multi-node engine writes its node's vllm-ext record (release and
selection) into the key-value store that torch.distributed's default group already
shares (served by rank 0's node), and compares:
- every rank but 0 with rank 0's record;
- rank 0 with every rank's, when node 0 has a selection: a rank that reports nothing
  runs a node without vllm-ext, which cannot have been given its flags.
A difference stops the worker with both records named, on each node that sees it.
Ray is left alone: its workers get the head's pickled config, so they cannot differ.

Invariant bent: none; the store is the group's own, and the keys are vllm-ext's.
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import timedelta
from typing import Any

from packaging.specifiers import SpecifierSet

from vllm_ext.patches.base import WORKER, Patch, Target

logger = logging.getLogger("vllm_ext")

KEY = "vllm_ext/node_record/{rank}"
# All ranks pass vLLM's rendezvous together and write straight after it: a record that
# has not come after this long will not come (a node without vllm-ext).
WAIT = timedelta(seconds=30)
STOCK = "nothing selected (stock vLLM)"


class NodeMismatchError(RuntimeError):
    """The nodes of one engine were started with different vllm-ext flags or releases."""


def node_record(version: str, selection: str, node_rank: int) -> dict[str, Any]:
    return {"version": version, "selection": selection, "node": node_rank}


def _runs(record: dict[str, Any]) -> str:
    return f"vllm-ext {record['version']} with {record['selection'] or STOCK}"


def agree(store: Any, rank: int, world_size: int, mine: dict[str, Any],
          wait: timedelta = WAIT) -> None:
    """Publish `mine` for `rank` and compare as the module docstring says; raises
    NodeMismatchError naming both sides. `store`: torch.distributed's Store interface."""
    store.set(KEY.format(rank=rank), json.dumps(mine))
    if rank == 0 and not mine["selection"]:
        return  # stock on node 0: a node with a selection finds the difference itself
    others = [0] if rank != 0 else list(range(1, world_size))
    for other in others:
        key = KEY.format(rank=other)
        try:
            store.wait([key], wait)
        except RuntimeError:  # torch raises a subclass of it on a timeout
            if other == 0:
                logger.warning("vllm-ext: node 0 reported no vllm-ext record in %.0f s (not "
                               "installed there?); this node's workers run %s unchecked",
                               wait.total_seconds(), mine["selection"] or STOCK)
                return
            raise NodeMismatchError(
                f"vllm-ext: rank {other} of this engine reported no vllm-ext record in "
                f"{wait.total_seconds():.0f} s, so its node runs without vllm-ext while node "
                f"{mine['node']} runs {_runs(mine)}. Install the same vllm-ext on every node "
                f"and give every node the same vllm-ext flags (docs/distributed.md).") from None
        theirs = json.loads(store.get(key))
        if (theirs["version"], theirs["selection"]) != (mine["version"], mine["selection"]):
            raise NodeMismatchError(
                f"vllm-ext: the nodes of this engine were started differently: node "
                f"{mine['node']} runs {_runs(mine)}, node {theirs['node']} runs "
                f"{_runs(theirs)}. Each node builds its workers from its own command line: "
                f"give every node the same vllm-ext flags and release (docs/distributed.md).")


class NodeAgreement(Patch):
    """multi-node engines: every node runs the same vllm-ext selection and release"""

    name = "node_agreement"
    process = WORKER
    targets = (Target("vllm.v1.worker.worker_base:WorkerWrapperBase.init_device", ("self",)),
               Target("vllm.v1.worker.worker_base:WorkerWrapperBase", attrs=("vllm_config",)),
               Target("vllm.config.parallel:ParallelConfig", attrs=(
                   "nnodes", "node_rank", "distributed_executor_backend")),
               # Where torch.distributed keeps the default group's store.
               Target("torch.distributed.distributed_c10d:_get_default_store", ()),
               Target("torch.distributed:get_rank", ("group",)),
               Target("torch.distributed:get_world_size", ("group",)))
    vllm_versions = SpecifierSet(">=0.32,<0.35")
    # Every node reports, with a selection or without: a stock node must be seen as one.
    components = ("*",)

    def wrap(self, original: Any) -> Any:
        @functools.wraps(original)
        def init_device(wrapper, *args, **kwargs):
            result = original(wrapper, *args, **kwargs)
            parallel = wrapper.vllm_config.parallel_config
            if parallel.nnodes > 1 and parallel.distributed_executor_backend != "ray":
                self._agree(wrapper.vllm_config)
            return result

        return init_device

    def _agree(self, vllm_config: Any) -> None:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        from vllm_ext._version import __version__
        from vllm_ext.config import ExtConfig

        self.reached()
        mine = node_record(__version__, ExtConfig.of(vllm_config).describe(),
                           vllm_config.parallel_config.node_rank)
        agree(_get_default_store(), dist.get_rank(), dist.get_world_size(), mine)
