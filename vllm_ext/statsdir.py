"""Where engine processes leave their statistics for the front end: a folder per engine.

`$VLLMEXT_STATS_DIR/engine-<k>/` holds everything engine k's processes write (the
scheduler's step log and SLO counts, each worker's KV-pool samples) and `engine.json`,
the engine's identity: k is its data-parallel index, which vLLM's own per-engine series
carry as their `engine` label, and the served model name their `model_name` label. With
`--data-parallel-size N` (one front end, N engine cores) the folders sit side by side,
so `/metrics` can label each of our series as vLLM labels its own; a server started for
one rank of an externally routed deployment (`--data-parallel-rank k`) has one folder,
named by its rank, as its engine label is.

Readers of the whole directory sum every engine's files (`**/` globs), so totals do not
depend on how many engines there are.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vllm_ext import envs

IDENTITY_FILE = "engine.json"
logger = logging.getLogger("vllm_ext")


@dataclass(frozen=True, slots=True)
class EngineDir:
    engine: str  # vLLM's `engine` label: the data-parallel index, as a string
    model_name: str
    path: Path


def engine_index(vllm_config) -> int:
    """The engine's data-parallel index: its rank, which vLLM keeps in
    `data_parallel_index` also for dense models, whose ranks it otherwise runs as
    independent DP=1 engines (rank reset to 0); declared in patches/internals.py."""
    return vllm_config.parallel_config.data_parallel_index


def for_engine(vllm_config) -> str | None:
    """The folder this process writes its engine's statistics to, made (with the
    engine's identity) if need be; None without a statistics directory."""
    root = envs.stats_dir()
    if root is None:
        return None
    if not os.path.isdir(root):
        # Inherited from another machine (Ray's V2 executor hands workers the head's
        # environment): there is nowhere here to write, and the engine runs on without.
        logger.warning("vllm-ext: %s=%s does not exist in this process's file system; this "
                       "process writes no statistics", envs.STATS_DIR, root)
        return None
    name = vllm_config.model_config.served_model_name
    if isinstance(name, (list, tuple)):  # vLLM labels with the first name
        name = name[0]
    return str(engine_folder(root, engine_index(vllm_config), name))


def engine_folder(root: str | os.PathLike, index: int, model_name: str) -> Path:
    """Engine `index`'s folder under `root`, made, with its identity."""
    path = Path(root) / f"engine-{index}"
    path.mkdir(exist_ok=True)
    # Written by each process (an operator's kept directory may hold another model's):
    # scheduler and workers start together, so each writes a whole file and renames it,
    # and a reader never sees half of one.
    tmp = path / f".{IDENTITY_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"engine": index, "model_name": model_name}))
    os.replace(tmp, path / IDENTITY_FILE)
    return path


def engines(directory: str | os.PathLike | None) -> list[EngineDir]:
    """The engines that wrote into `directory`, by index."""
    found = []
    for identity in Path(directory).glob(f"engine-*/{IDENTITY_FILE}") if directory else ():
        try:
            data = json.loads(identity.read_text())
        except (OSError, ValueError):
            continue
        found.append(EngineDir(str(data["engine"]), str(data["model_name"]), identity.parent))
    return sorted(found, key=lambda e: int(e.engine))
