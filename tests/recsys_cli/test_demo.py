"""`recsys demo`'s final table and verdict line (recsys_cli/commands/demo.py), without training."""

from __future__ import annotations

from recsys_cli.commands.demo import ALLOW_BELOW, ceiling_note, export_accepts, final_report, verdict

BASE = {"popularity": {"HR@10": 0.08, "NDCG@10": 0.040}, "last-item": {"HR@10": 0.15, "NDCG@10": 0.0800}}
SASREC = {"HR@10": 0.12, "NDCG@10": 0.0650}


def served(rerank: float, baselines: dict[str, dict[str, float]] | None = None) -> dict[str, object]:
    payload: dict[str, object] = {
        "version": "v1", "users": 199, "served_stages": ["retrieval", "prerank", "rerank"],
        "cuts": {"retrieval": {"NDCG@10": 0.06}, "prerank": {"NDCG@10": 0.062}, "rerank": {"NDCG@10": rerank}}}
    if baselines is not None:
        payload["baselines"] = baselines
    return payload


def test_a_losing_served_cut_gets_one_line_naming_the_best_baseline_and_the_gap() -> None:
    text = final_report(BASE, "sasrec(M=1) alone", SASREC, served(0.0712))
    lines = [line for line in text.splitlines() if line.startswith("verdict:")]
    assert lines == ["verdict: BELOW BASELINE: the served cut (+ rerank (served), NDCG@10 0.0712) does not beat "
                     "last-item (0.0800, -0.0088); the demo published it anyway (the best "
                     "path it has)"]


def test_a_winning_served_cut_says_by_how_much() -> None:
    line = verdict({**BASE, "+ rerank (served)": {"NDCG@10": 0.0923}}, "+ rerank (served)", list(BASE))
    assert line == ("verdict: the served cut (+ rerank (served), NDCG@10 0.0923) beats every baseline; "
                    "best last-item 0.0800, +0.0123")


def test_a_tie_is_not_a_win_and_the_gate_clause_follows() -> None:
    line = verdict({**BASE, "retrieval": {"NDCG@10": 0.08}}, "retrieval", list(BASE), gate="the gate said so")
    assert line.startswith("verdict: BELOW BASELINE") and line.endswith("; the gate said so")


def test_the_table_has_every_row_once_and_says_where_each_comes_from() -> None:
    text = final_report(BASE, "sasrec(M=1) alone", SASREC, served(0.0712))
    names = [line.split("  ")[0] for line in text.splitlines()]
    for row in ("popularity", "last-item", "sasrec(M=1) alone", "retrieval", "+ prerank", "+ rerank (served)"):
        assert names.count(row) == 1, row
    assert "== v1: 199 test users ==" in text
    assert "popularity, last-item: the demo" in text and "recsys evaluate --artifacts (the served pipeline" in text


def test_baselines_from_evaluate_replace_the_demos_own() -> None:
    evaluated = {**BASE, "item2item": {"NDCG@10": 0.09}}
    text = final_report(BASE, "sasrec(M=1) alone", SASREC, served(0.0712, evaluated))
    assert "popularity, last-item, item2item alone: recsys evaluate --artifacts (same users and lists)" in text
    assert "does not beat item2item alone (0.0900, -0.0188)" in text


def test_evaluates_paired_verdict_decides_and_its_se_is_shown() -> None:
    # served above the best mean but within one paired SE: below, as the publish gate rules
    payload = {**served(0.0850, dict(BASE)),
               "verdict": {"best": "last-item", "served_minus_best": 0.0050, "paired_se": 0.0061, "beats": False}}
    text = final_report(BASE, "sasrec(M=1) alone", SASREC, payload, gate="the publish gate said so")
    (line,) = [line for line in text.splitlines() if line.startswith("verdict:")]
    assert line == ("verdict: BELOW BASELINE: the served cut (+ rerank (served), NDCG@10 0.0850) does not beat "
                    "last-item (0.0800, +0.0050, paired SE 0.0061); the demo published it anyway (the "
                    "best path it has); the publish gate said so")


def test_export_flag_is_read_from_the_parser() -> None:
    assert export_accepts("--no-regression-check")
    assert not export_accepts("--no-such-flag")
    assert isinstance(export_accepts(ALLOW_BELOW), bool)


def test_baselines_of_another_shape_fall_back_to_the_demos_own() -> None:
    text = final_report(BASE, "sasrec(M=1) alone", SASREC, served(0.0712, {"popularity": {"se": 0.01}}))
    assert "popularity, last-item: the demo" in text and "does not beat last-item" in text


def test_a_retriever_ended_by_its_ceiling_says_so_and_how_to_train_longer() -> None:
    assert ceiling_note("early stop", 42, 52) is None
    line = ceiling_note("epochs", 15, 15)
    assert line is not None and line.startswith("its epoch ceiling ended it before early stopping did") and "best epoch 15 of 15" in line
    assert "--minutes M" in line
    minutes = ceiling_note("max minutes", 30, 31)
    assert minutes is not None and minutes.startswith("its time ceiling")
