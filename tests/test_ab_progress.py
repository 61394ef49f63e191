"""What `vllm-ext bench ab` shows while it runs (a fake clock, no engine), and the
report's one sentence when matplotlib is missing."""

from __future__ import annotations

import html
import io
import sys
import time

import pytest

from vllm_ext.ab import plots, report, runner
from vllm_ext.ab.cli import print_headline
from vllm_ext.ab.progress import Progress
from vllm_ext.ab.config import ABConfig, Arm, ArmResult
from vllm_ext.ab.traces import LengthDist, synthesize


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def logged(enabled: bool = True):
    """A reporter writing to a non-terminal stream, its clock, and the stream."""
    clock, stream = Clock(), io.StringIO()
    return Progress(enabled, stream=stream, tty=False, clock=clock, tick_s=None), clock, stream


def test_log_gets_a_line_every_ten_seconds_and_one_at_the_end():
    progress, clock, stream = logged()
    with progress.replay("[sarathi] seed 0 (1/2)", 16) as p:
        p.tokens(3)
        p.request_done()
        clock.now += 9.9
        p.tick()  # not yet due
        p.tokens(500)
        clock.now += 0.2
        p.tick()
        clock.now += 5
        p.tokens(31)
        for _ in range(11):
            p.request_done()
        p.tick()  # 5 s after the last line: rate-limited
        clock.now += 5
        p.tick()
        clock.now += 2.4
        p.request_done()
    assert stream.getvalue().splitlines() == [
        "[sarathi] seed 0 (1/2): replaying 16 requests",
        "[sarathi] seed 0 (1/2): 1/16 requests done, 503 tokens, 10 s elapsed",
        "[sarathi] seed 0 (1/2): 12/16 requests done, 534 tokens, 20 s elapsed",
        "[sarathi] seed 0 (1/2): 13/16 requests done, 534 tokens, 23 s elapsed",  # the end
    ]


def test_phases_are_one_line_each_and_no_progress_is_silent():
    progress, clock, stream = logged()
    progress.phase("[base] starting vllm serve")
    assert stream.getvalue() == "[base] starting vllm serve\n"
    quiet, clock, stream = logged(enabled=False)
    quiet.phase("[base] starting vllm serve")
    with quiet.replay("[base] seed 0 (1/1)", 4) as p:
        p.tokens(5)
        clock.now += 60
        p.tick()
    assert stream.getvalue() == ""


def test_ticker_thread_writes_lines_while_no_tokens_come():
    stream = io.StringIO()
    progress = Progress(stream=stream, tty=False, every_s=0.05, tick_s=0.01)
    with progress.replay("[a] seed 0 (1/1)", 2) as p:
        p.tokens(7)
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3 and all("0/2 requests done, 7 tokens" in l for l in lines[1:])


def test_terminal_gets_a_bar_with_the_token_count():
    clock, stream = Clock(), io.StringIO()
    progress = Progress(stream=stream, tty=True, clock=clock, tick_s=None)
    with progress.replay("[a] seed 0 (1/1)", 4) as p:
        p.request_done()
        p.tokens(42)
        p.tick()
    shown = stream.getvalue()
    assert "[a] seed 0 (1/1)" in shown and "1/4" in shown and "42 tokens" in shown
    assert "replaying" not in shown  # the bar, not log lines


def test_runner_feeds_the_replay_progress(monkeypatch):
    """_replay_measured wires the client's callbacks to the reporter."""
    def fake_replay(url, model, trace, vocab, on_done=None, on_tokens=None, sending=None):
        for i, _ in enumerate(trace.requests):
            on_tokens(2)
            on_tokens(1)
            on_done(None)
        return []

    monkeypatch.setattr(runner, "replay", fake_replay)
    monkeypatch.setattr(runner.ServerView, "scrape", classmethod(lambda cls, url: cls()))
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    progress, _, stream = logged()
    cfg = _config(None, progress)
    runner._replay_measured("http://x", "m", cfg.traces[0], cfg, "[a] seed 0 (1/1)")
    assert stream.getvalue().splitlines()[-1] == "[a] seed 0 (1/1): 3/3 requests done, 9 tokens, " \
                                                 "0 s elapsed"


def _config(out, progress=None) -> ABConfig:
    trace = synthesize(3, "poisson", LengthDist("fixed", 8), LengthDist("fixed", 3), seed=0, qps=1)
    return ABConfig(model="m", arms=[Arm("a"), Arm("b")], traces=[trace], out=out, vocab_size=64,
                    prompts=None, progress=progress or Progress(enabled=False))


@pytest.fixture
def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails


def _failed_results() -> list[ArmResult]:
    return [ArmResult(Arm("a"), error="ServerError: boom"), ArmResult(Arm("b"), error="boom")]


def test_report_says_once_that_plots_need_matplotlib(no_matplotlib, tmp_path, capsys):
    cfg = _config(tmp_path)
    results = _failed_results()
    report.write(cfg, results, {})
    for page in ("summary.md", "report.html"):
        text = html.unescape((tmp_path / page).read_text())
        assert text.count("matplotlib is not installed") == 1, page
        assert "pip install 'vllm-ext[bench]'" in text
    print_headline(cfg, results, {})
    out = capsys.readouterr().out
    assert out.count(plots.MISSING) == 1
    assert not (tmp_path / "plots").exists()


def test_no_such_sentence_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cfg = _config(tmp_path)
    report.write(cfg, _failed_results(), {})
    print_headline(cfg, _failed_results(), {})
    assert plots.missing() is None
    assert "matplotlib" not in (tmp_path / "summary.md").read_text()
    assert "matplotlib" not in capsys.readouterr().out
