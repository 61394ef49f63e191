"""`vllm-ext bench ab` refuses bad input before any server starts: exit code 2 and one
line naming what is wrong and what is allowed."""

from __future__ import annotations

import pytest

from vllm_ext.tools.cli import main


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 512}')
    return str(tmp_path)


@pytest.mark.parametrize("extra, says", [
    (["--arm", "no-equals-sign"], 'expected NAME="FLAGS"'),
    (["--arm", "a=--x", "--arm", "a=--y"], "arm names must differ; repeated: a"),
    (["--arm", "a b=--x"], "use letters, digits"),
    (["--arm", 'a=--x "unclosed'], "cannot split its flags"),
    (["--endpoint", "a=localhost:8000"], "URL must start with http://"),
    (["--arm", "a=", "--prompt-len", "normal:5"], "--prompt-len 'normal:5': use N | fixed:N"),
    (["--arm", "a=", "--output-len", "0"], "--output-len '0': token counts are whole numbers >= 1"),
    (["--arm", "a=", "--arrival", "gamma", "--qps", "0"], "needs a QPS > 0"),
    (["--arm", "a=", "--arrival", "concurrency"], "needs a concurrency >= 1"),
    (["--arm", "a=", "--seeds", "0"], "--seeds must be >= 1"),
    (["--arm", "a=", "--capacity", "--capacity-qps", "5:1"], "0 < LO < HI"),
    (["--arm", "a=", "--capacity", "--capacity-qps", "fast"], "expected LO:HI"),
    ([], "no arms"),
    (["--arm", "a=", "--slo-mix", "chat=0.9,doc=0.2"], "--slo-mix: shares sum to 1.1, not 1"),
    (["--arm", "a=", "--slo-mix", "chat=1", "--trace-csv", "t.csv"], "a --trace-csv states them"),
    (["--arm", "a=", "--slo-priority", "chat=first"], "--slo-priority 'chat=first': expected"),
    (["--arm", "a=--scheduler vllm", "--slo-mix", "chat=1", "--slo-priority", "chat=0"],
     "no arm is served with --scheduling-policy priority"),
    (["--arm", "a=--scheduling-policy priority", "--slo-mix", "chat=0.5,doc=0.5",
      "--slo-priority", "chat=0"], "gives no priority to the trace's class doc"),
    (["--arm", "a=", "--slo-priority", "default=0", "--slo-priority-arms", "b"],
     "--slo-priority-arms: no arm named b"),
    (["--arm", "a=", "--slo-priority-arms", "a"], "--slo-priority-arms needs --slo-priority"),
])
def test_bad_configuration_exits_2_before_starting_anything(model_dir, capsys, extra, says):
    assert main(["bench", "ab", "--model", model_dir, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-ext bench ab: error: ") and says in err


def test_serve_arms_need_a_model(capsys):
    assert main(["bench", "ab", "--arm", "a=--scheduler vllm"]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_vocabulary_must_be_known(tmp_path, capsys):
    assert main(["bench", "ab", "--model", str(tmp_path), "--arm", "a="]) == 2
    assert "pass --vocab-size" in capsys.readouterr().err


def test_malformed_trace_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "trace.csv"
    bad.write_text("arrival,prompt_tokens,output_tokens\n0,10,5\n0.5,ten,5\n")
    assert main(["bench", "ab", "--model", model_dir, "--arm", "a=", "--trace-csv", str(bad)]) == 2
    assert "line 3: '0.5,ten,5' is not" in capsys.readouterr().err


def test_malformed_prompt_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "hi"}\n{"question": "?"}\n')
    assert main(["bench", "ab", "--model", model_dir, "--arm", "a=",
                 "--equivalence-prompts", str(bad)]) == 2
    assert "prompts.jsonl, line 2: expected" in capsys.readouterr().err
