import math

import pytest

from lightning_cit.metrics import edit_similarity, exact_match, rouge_l, summarize


def test_worked_example_of_methods_md():
    # methods.md §1.4: R = [[80,.,.],[70,85,.],[60,75,90]] (rows after tasks 1..3); our row 0 is the base
    R = [[0, 0, 0], [80, 10, 5], [70, 85, 7], [60, 75, 90]]
    s = summarize(R)
    assert s["acc"] == pytest.approx(75.0)
    assert s["nta"] == pytest.approx(85.0)
    assert s["bwt_gem"] == pytest.approx(-15.0)
    assert s["bwt_trace"] == pytest.approx(-10.0)
    assert s["forgetting_chaudhry"] == pytest.approx(15.0)
    assert s["fgt_proxymix"] == pytest.approx(15.0)
    assert s["forgetting_mssr"] == pytest.approx(15.0)
    # fwt: (R[1][2] - R[0][2] + R[2][3] - R[0][3]) / 2 = (10 + 7) / 2
    assert s["fwt"] == pytest.approx(8.5)


def test_conventions_differ_where_the_papers_differ():
    # task 1 peaks after task 2 (transfer), then drops: Chaudhry uses the max over past rows,
    # MSSR the largest drop from the just-learned score, ProxyMix clips at zero
    R = [[0, 0, 0], [50, 0, 0], [90, 60, 0], [40, 70, 80]]
    s = summarize(R)
    assert s["forgetting_chaudhry"] == pytest.approx(((90 - 40) + (60 - 70)) / 2)
    assert s["fgt_proxymix"] == pytest.approx(((90 - 40) + 0) / 2)
    assert s["forgetting_mssr"] == pytest.approx(((50 - 40) + (60 - 70)) / 2)
    assert s["bwt_gem"] == pytest.approx(((40 - 50) + (70 - 60)) / 2)


def test_single_task_backward_metrics_are_undefined():
    s = summarize([[10.0], [90.0]])
    assert s["acc"] == 90.0 and math.isnan(s["bwt_gem"]) and math.isnan(s["fwt"])


def test_incomplete_matrix_is_rejected():
    with pytest.raises(ValueError, match="complete"):
        summarize([[1, 2], [3, 4]])


def test_text_metrics_golden_values():
    assert exact_match(" abc ", "abc") == 100.0 and exact_match("abd", "abc") == 0.0
    assert edit_similarity("abcdef", "abcdef") == 100.0
    assert edit_similarity("abcdef", "abcxef") == pytest.approx(100 * (1 - 1 / 6))
    assert edit_similarity("", "abc") == 0.0
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(100.0)
    # LCS "the cat" of 3-token sequences: P = R = 2/3
    assert rouge_l("the cat ran", "the cat sat") == pytest.approx(100 * 2 / 3)
