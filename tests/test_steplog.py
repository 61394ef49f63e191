"""Step logs across processes, and their Prometheus export (no engine needed)."""

from __future__ import annotations

import pytest

import subprocess
import sys

from vllm_ext.schedulers.steplog import StepLogWriter, StepRecord, read_dir


def _rec(i: int, wall: float = 0.02, predicted: float = 0.0) -> StepRecord:
    return StepRecord(float(i), wall, decode_tokens=3, prefill_tokens=10 * i, prefill_reqs=1,
                      partial_prefills=i % 2, running_decodes=3, preempted=0, waiting=1,
                      predicted_s=predicted, pipelined_chunks=i, min_slack_s=0.5 - i,
                      first_tokens=i, deadline_misses=i - 1)


_WRITER = """
import sys
from vllm_ext.schedulers.steplog import StepLogWriter, StepRecord
w = StepLogWriter(sys.argv[1], capacity=4)
for i in range(int(sys.argv[2])):
    w.append(StepRecord(float(i), 0.2, 3, 10, 1, 0, 3, 0, 1))
w.close()
"""


def test_ring_keeps_latest_and_totals_keep_everything(tmp_path):
    w = StepLogWriter(tmp_path, capacity=4)
    for i in range(10):
        w.append(_rec(i))
    stats = read_dir(tmp_path)
    assert stats.steps == 10
    assert [r.t_start for r in stats.recent] == [6.0, 7.0, 8.0, 9.0]
    assert stats.totals["prefill_tokens"] == sum(10 * i for i in range(10))
    assert stats.totals["partial_prefills"] == 5
    assert dict(stats.step_seconds_buckets)[0.025] == 10
    w.close()


def test_reader_sums_writers_in_other_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(n)])
             for n in (3, 5)]
    assert [p.wait(60) for p in procs] == [0, 0]
    stats = read_dir(tmp_path)
    assert stats.steps == 8 and stats.totals["decode_tokens"] == 24
    assert dict(stats.step_seconds_buckets)[0.25] == 8


def test_missing_directory_reads_as_zero(tmp_path):
    assert read_dir(tmp_path / "nope").steps == 0
    assert read_dir(None).recent == ()


def test_prometheus_export_labels_each_engine_as_vllm_does(monkeypatch, tmp_path):
    from prometheus_client import generate_latest

    from vllm_ext.frontend import metrics
    from vllm_ext.statsdir import engine_folder

    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    metrics.prepare_front_end()
    w = StepLogWriter(engine_folder(tmp_path, 0, "m"))
    w.append(_rec(1, wall=0.3, predicted=0.25))
    w.append(_rec(2, wall=3.0, predicted=2.5))
    other = StepLogWriter(engine_folder(tmp_path, 1, "m"))
    other.append(_rec(3, wall=0.01))
    text = generate_latest().decode()
    e0, e1 = '{engine="0",model_name="m"}', '{engine="1",model_name="m"}'
    # predicted beside measured, per step and summed
    assert f"vllm_ext_last_step_predicted_s{e0} 2.5" in text
    assert f"vllm_ext_last_step_wall_s{e0} 3.0" in text
    assert f"vllm_ext_step_predicted_seconds_total{e0} 2.75" in text
    assert f"vllm_ext_step_seconds_sum{e0} 3.3" in text
    assert f"vllm_ext_pipelined_chunks_total{e0} 3.0" in text
    assert f"vllm_ext_steps_total{e0} 2.0" in text and f"vllm_ext_steps_total{e1} 1.0" in text
    assert f"vllm_ext_prefill_tokens_total{e0} 30.0" in text
    assert 'vllm_ext_step_seconds_bucket{engine="0",le="0.5",model_name="m"} 1.0' in text
    assert 'vllm_ext_step_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0' in text
    assert 'vllm_ext_step_seconds_bucket{engine="1",le="0.01",model_name="m"} 1.0' in text
    assert f"vllm_ext_last_step_prefill_tokens{e0} 20.0" in text
    assert f"vllm_ext_last_step_prefill_tokens{e1} 30.0" in text
    # deadline-aware scheduling: first tokens and misses summed, the latest step's slack
    assert f"vllm_ext_first_tokens_total{e0} 3.0" in text
    assert f"vllm_ext_deadline_misses_total{e0} 1.0" in text
    assert f"vllm_ext_last_step_min_slack_s{e0} -1.5" in text
    # in Python: every engine, each one, and a clear error for one that is not there
    assert metrics.step_stats().steps == 3
    assert {k: v.steps for k, v in metrics.step_stats_by_engine().items()} == {0: 2, 1: 1}
    assert metrics.step_stats(engine=1).totals["wall_s"] == 0.01
    with pytest.raises(LookupError, match=r"no engine 2 .*engines: \[0, 1\]"):
        metrics.step_stats(engine=2)
    w.close()
    other.close()


def test_front_end_keeps_an_operator_dir_but_not_an_inherited_one(monkeypatch, tmp_path):
    import os

    from vllm_ext.frontend import metrics

    monkeypatch.setenv("VLLMEXT_STATS_DIR", str(tmp_path))
    monkeypatch.delenv("VLLMEXT_STATS_OWNER", raising=False)
    assert metrics.prepare_front_end() == str(tmp_path)  # set by the operator: shared

    monkeypatch.setenv("VLLMEXT_STATS_OWNER", str(os.getppid()))  # another front end's
    own = metrics.prepare_front_end()
    assert own != str(tmp_path) and os.environ["VLLMEXT_STATS_OWNER"] == str(os.getpid())
    assert metrics.prepare_front_end() == own  # and stays ours
