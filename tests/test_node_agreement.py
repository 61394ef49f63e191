"""The nodes of a multi-node engine compare their vllm-ext records (patches/node_agreement.py)
through a real torch.distributed TCPStore, each rank in a thread as each worker would be.

The engine-wide proof, two `vllm serve` nodes that agree, is tests/test_multinode.py."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from torch.distributed import TCPStore

from vllm_ext.patches.node_agreement import NodeMismatchError, agree, node_record
from vllm_ext.tools.serve import free_port

SARATHI = "scheduler=sarathi(token_budget=256); attn=pod"
SHORT = timedelta(seconds=2)


def _run(records: dict[int, dict | None], world_size: int = 2) -> dict[int, BaseException | None]:
    """Each rank with a record runs `agree` in its own thread against one store (rank 0's
    hosting it, as torch's default group does); a rank whose record is None stands for a
    node without vllm-ext and writes nothing. Returns what each rank raised."""
    port = free_port()
    server = TCPStore("127.0.0.1", port, world_size, True, timeout=timedelta(seconds=30),
                      wait_for_workers=False)
    outcome: dict[int, BaseException | None] = {}

    def rank(r: int) -> None:
        store = server if r == 0 else TCPStore("127.0.0.1", port, world_size, False,
                                               timeout=timedelta(seconds=30))
        try:
            agree(store, r, world_size, records[r], wait=SHORT)
            outcome[r] = None
        except BaseException as e:  # noqa: BLE001 - recorded for the test to judge
            outcome[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in records if records[r]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcome


def test_nodes_started_alike_agree():
    same = {r: node_record("0.1.0", SARATHI, r) for r in (0, 1)}
    assert _run(same) == {0: None, 1: None}


def test_a_node_without_the_flags_stops_both_nodes_naming_each_side():
    outcome = _run({0: node_record("0.1.0", SARATHI, 0), 1: node_record("0.1.0", "", 1)})
    for r in (0, 1):
        assert isinstance(outcome[r], NodeMismatchError)
        message = str(outcome[r])
        assert f"with {SARATHI}" in message
        assert "with nothing selected (stock vLLM)" in message
        assert "same vllm-ext flags" in message


def test_flags_on_a_later_node_only_stop_that_node():
    # Node 0 is stock: it waits for nobody, and the node that differs says so.
    outcome = _run({0: node_record("0.1.0", "", 0), 1: node_record("0.1.0", SARATHI, 1)})
    assert outcome[0] is None
    assert isinstance(outcome[1], NodeMismatchError)


def test_another_release_on_a_node_is_a_difference():
    outcome = _run({0: node_record("0.1.0", SARATHI, 0), 1: node_record("0.2.0", SARATHI, 1)})
    assert all(isinstance(outcome[r], NodeMismatchError) for r in (0, 1))
    assert "vllm-ext 0.2.0 with" in str(outcome[0])


def test_a_node_without_vllm_ext_stops_node_0_when_it_has_a_selection():
    outcome = _run({0: node_record("0.1.0", SARATHI, 0), 1: None})
    assert isinstance(outcome[0], NodeMismatchError)
    assert "rank 1 of this engine reported no vllm-ext record" in str(outcome[0])


def test_node_0_without_vllm_ext_is_warned_of_and_not_waited_for_forever(caplog):
    with caplog.at_level(logging.WARNING, logger="vllm_ext"):
        outcome = _run({0: None, 1: node_record("0.1.0", "", 1)})
    assert outcome == {1: None}
    assert "node 0 reported no vllm-ext record" in caplog.text


def test_node_0_compares_every_rank():
    records = {0: node_record("0.1.0", SARATHI, 0), 1: node_record("0.1.0", SARATHI, 0),
               2: node_record("0.1.0", "", 1)}
    outcome = _run(records, world_size=3)
    assert outcome[1] is None  # rank 1 is on node 0 and agrees with rank 0
    assert isinstance(outcome[0], NodeMismatchError) and "node 1 runs" in str(outcome[0])
    assert isinstance(outcome[2], NodeMismatchError)
