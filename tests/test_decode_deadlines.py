"""The engine-free halves of per-request TBT deadlines: Metron's walk per request, which
decodes may sit a step out, and the per-class counts the metrics endpoint reads."""

from __future__ import annotations

from vllm_ext.ab.metron import Timeline, deadline_misses
from vllm_ext.schedulers.decode_deadlines import DecodeDeadlines
from vllm_ext.schedulers.slo_counts import SLOCounts, read_counts


def test_the_walk_banks_early_tokens_and_restarts_after_a_late_one():
    d = DecodeDeadlines(max_defer_steps=4)
    d.first_token("early", 10.0, 1.0, deadline=10.5, slo_class="a")
    assert d.due("early") == 11.5  # the first token's slack is banked too
    d.first_token("r", 10.0, 1.0, deadline=9.0, slo_class="a")
    assert d.due("r") == 11.0
    assert d.delivered([("r", 1)], 10.2) == {"a": [1, 0]}  # early: next due at 12, not 11.2
    assert d.due("r") == 12.0 and d.due("r", ahead=2) == 14.0
    assert d.delivered([("r", 0)], 99.0) == {}  # nothing new
    assert d.delivered([("r", 1)], 13.5) == {"a": [0, 1]}  # late: restarts from it
    assert d.due("r") == 14.5
    assert d.delivered([("r", 2)], 14.5) == {"a": [2, 0]}  # two at once (speculative)
    assert d.due("r") == 16.5
    d.first_token("b", 10.0, 2.0, slo_class="b")
    assert d.delivered([("r", 1), ("b", 1), ("early", 1), ("none", 9)], 12.0) == \
        {"a": [1, 1], "b": [1, 0]}  # r on time, early late (due 11.5)
    d.first_token("no-tbt", 10.0, None)
    assert "no-tbt" not in d and d.delivered([("no-tbt", 3)], 99.0) == {}


def test_the_walk_counts_a_token_late_when_metron_counts_a_miss():
    """Per token, on time exactly when Metron's slack-carrying walk (the A/B harness's)
    counts no miss at that token."""
    times = [1.0, 1.4, 1.9, 3.5, 3.6, 5.0, 5.1]
    d = DecodeDeadlines(0)
    d.first_token("r", times[0], 0.5, deadline=2.0)
    late_tokens = [d.delivered([("r", 1)], t)[""][1] for t in times[1:]]
    for k in range(1, len(times)):
        before = deadline_misses(Timeline.of(0.0, [(t, 1) for t in times[:k]]), 2.0, 0.5)[0]
        after = deadline_misses(Timeline.of(0.0, [(t, 1) for t in times[:k + 1]]), 2.0, 0.5)[0]
        assert bool(late_tokens[k - 1]) == (after > before), k


def _walks(d: DecodeDeadlines, **dues: tuple[float, float]) -> None:
    """Requests decoding with (tbt, next token due)."""
    for req_id, (tbt, due) in dues.items():
        d.first_token(req_id, due - tbt, tbt)


def test_only_looser_classes_ahead_of_their_deadline_sit_out_latest_due_first():
    def fresh() -> DecodeDeadlines:
        d = DecodeDeadlines(max_defer_steps=2)
        _walks(d, batch_far=(2.0, 9.0), batch_near=(2.0, 5.5), batch_mid=(2.0, 7.0),
               chat=(0.2, 9.0), same=(0.5, 9.0))
        return d

    decodes = [(r, 0) for r in ("batch_far", "batch_near", "batch_mid", "chat", "same")]
    # The prefill's class reads at 0.5 s a token; its first token is due at 6.
    # batch_near's next token is due before the step after next (earliest 6): it stays;
    # chat is stricter and `same` is as strict: they never yield.
    assert fresh().choose(1, decodes, 0.5, 6.0, 6.0, want=5) == ["batch_far", "batch_mid"]
    assert fresh().choose(1, decodes, 0.5, 6.0, 6.0, want=1) == ["batch_far"]
    # A prefill due after a decode's next token does not take its slot.
    assert fresh().choose(1, decodes, 0.5, 8.0, 6.0, want=5) == ["batch_far"]
    # Tokens in flight (the async loop) push the token to schedule a TBT later.
    assert fresh().choose(1, [("batch_near", 1)], 0.5, 6.0, 6.0, want=1) == ["batch_near"]
    # Two steps in a row is the bound; a step served in between ends the run.
    d = fresh()
    assert d.choose(1, decodes, 0.5, 6.0, 6.0, want=1) == ["batch_far"]
    assert d.choose(2, decodes, 0.5, 6.0, 6.0, want=1) == ["batch_far"]
    assert d.choose(3, decodes, 0.5, 6.0, 6.0, want=1) == ["batch_mid"]
    assert d.choose(5, decodes, 0.5, 6.0, 6.0, want=1) == ["batch_far"]


def test_nothing_sits_out_for_a_prefill_without_a_tbt_deadline_or_with_bound_zero():
    d = DecodeDeadlines(max_defer_steps=2)
    _walks(d, batch=(2.0, 9.0))
    assert d.choose(1, [("batch", 0)], None, 0.0, 0.0, want=1) == []
    assert d.choose(1, [("batch", 0)], 0.5, 0.0, 0.0, want=0) == []
    off = DecodeDeadlines(max_defer_steps=0)
    _walks(off, batch=(2.0, 9.0))
    assert off.choose(1, [("batch", 0)], 0.5, 0.0, 0.0, want=1) == []


def test_counts_per_class_are_summed_over_processes(tmp_path, monkeypatch):
    a = SLOCounts(tmp_path)
    a.add("chat", first_met=1, tokens_met=3)
    a.add("batch", first_missed=1, decodes_deferred=2)
    a.flush()
    monkeypatch.setattr("os.getpid", lambda: 1)  # a second engine process
    b = SLOCounts(tmp_path)
    b.add("chat", first_met=2, tokens_missed=1)
    b.flush()
    counts = read_counts(tmp_path)
    assert counts["chat"] == {"first_met": 3, "first_missed": 0, "tokens_met": 3,
                              "tokens_missed": 1, "decodes_deferred": 0}
    assert counts["batch"]["decodes_deferred"] == 2 and counts["batch"]["first_missed"] == 1
    a.add("chat", first_met=1)
    a.flush()  # within a second of the last write: not yet
    assert read_counts(tmp_path)["chat"]["first_met"] == 3
    a.flush(force=True)
    assert read_counts(tmp_path)["chat"]["first_met"] == 4
    assert read_counts(None) == {} and read_counts(tmp_path / "none") == {}
