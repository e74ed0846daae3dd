"""Recipient accuracy: scored only where the instruction names the gold recipient, compared after the
synthesis' agent-id normalisation, averaged over those rows only, and shown per anchor."""

from tasks.eval.metrics import aggregate, score_row
from tasks.protocol import SlipMessage, agent_id_as_written, format_tqt, names_agent, normalise_agent
from tasks.release.report import results_section


def _row(prompt: str, src: str, dst: str, anchor: str) -> dict:
    gold = format_tqt("t", SlipMessage(src, dst, anchor, ("x",)))
    return {"task": "slipstream", "anchor": anchor,
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": gold}]}


def _answer(src: str, dst: str, anchor: str) -> str:
    return format_tqt("t", SlipMessage(src, dst, anchor, ("x",)))


def test_normalise_agent_and_names_agent():
    assert normalise_agent("  Carol ") == "carol" and normalise_agent("Ops  Bot") == "ops_bot"
    assert normalise_agent("data-eng.2!") == "data-eng.2"
    assert agent_id_as_written("  Tobias ") == "Tobias" and agent_id_as_written("Ops  Bot!") == "Ops_Bot"
    assert normalise_agent(agent_id_as_written("Ops  Bot!")) == normalise_agent("Ops Bot") == "ops_bot"
    assert names_agent("Have carol run the nightly backfill", "carol")
    assert names_agent("Ask the ops bot and ops-bot's friend", "ops_bot")
    assert not names_agent("Ask Caroline", "carol") and not names_agent("Deploy the model", "executor")


def test_dst_scored_only_where_the_recipient_is_named():
    named = _row("Have Carol run the nightly backfill.", "coordinator", "carol", "RequestTask")
    unnamed = _row("Deploy the latest model to staging", "ml_engineer", "executor", "RequestTask")
    assert score_row(named, _answer("coordinator", "carol", "RequestTask"))["dst_accuracy"] == 1.0
    assert score_row(named, _answer("coordinator", "Carol", "RequestTask"))["dst_accuracy"] == 1.0
    assert score_row(named, _answer("Coordinator", "Carol", "RequestTask"))["src_dst_accuracy"] == 1.0
    assert score_row(named, _answer("planner", "Carol", "RequestTask"))["src_dst_accuracy"] == 0.0
    assert score_row(named, _answer("coordinator", "coordinator", "RequestTask"))["dst_accuracy"] == 0.0
    assert score_row(named, "THOUGHT: x\nSLIP: not a message")["dst_accuracy"] == 0.0
    unnamed_scores = score_row(unnamed, _answer("a", "b", "RequestTask"))
    assert unnamed_scores["dst_accuracy"] is None and unnamed_scores["src_dst_accuracy"] == 0.0


def test_the_mean_is_over_named_rows_and_the_report_has_a_per_anchor_table():
    rows = [_row("Have Carol run it.", "coordinator", "carol", "RequestTask"),
            _row("Tell Dave the job is done.", "coordinator", "dave", "InformComplete"),
            _row("Tell Erin it is done.", "coordinator", "erin", "InformComplete"),
            _row("Deploy the model", "ml_engineer", "executor", "RequestTask")]
    answers = [_answer("coordinator", "carol", "RequestTask"), _answer("coordinator", "dave", "InformComplete"),
               _answer("coordinator", "planner", "InformComplete"), _answer("x", "y", "RequestTask")]
    scored = [score_row(r, a) for r, a in zip(rows, answers)]
    summary = aggregate("slipstream", scored, [{"latency_s": 0.1}] * 4, 1.0)
    assert summary["dst_accuracy"] == round(2 / 3, 4) and summary["recipient_rows"] == 3
    assert summary["dst_per_anchor"] == {"InformComplete": 0.5, "RequestTask": 1.0}
    assert summary["anchor_accuracy"] == 1.0
    report = "\n".join(results_section("slipstream", {"merged": {**summary, "runner": "llama.cpp server"}}))
    assert "recipient (dst) acc." in report and "### Recipient (dst) accuracy per anchor" in report
    assert "| InformComplete | 50.0% |" in report and "| RequestTask | 100.0% |" in report
    none_named = aggregate("slipstream", [scored[3]], [{"latency_s": 0.1}], 1.0)
    assert none_named["dst_accuracy"] is None and none_named["recipient_rows"] == 0
