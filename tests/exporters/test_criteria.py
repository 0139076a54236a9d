"""The validation criteria on hand-made arrays (exporters.criteria): each check's verdict, value and
report fields, so that a check that passes wrongly, or reports the wrong numbers, fails here."""

from __future__ import annotations

import numpy as np
import pytest

from exporters.criteria import (
    DECISIVE_FACTOR,
    MAX_REL_ERR,
    Checker,
    Criteria,
    ValidationReport,
    closeness_ratio,
    relative_logit_error,
    softmax_confidence,
    top2_margin,
)


def checker(precision: str) -> Checker:
    crit = Criteria.for_precision(precision, None, None, None, None)
    return Checker(ValidationReport("e", "c", "cpu", precision, [1], [0.5]), crit)


# -- defaults and overrides --------------------------------------------------------------------------------
def test_default_criteria_per_precision():
    fp32 = Criteria.for_precision("fp32", None, None, None, None)
    assert (fp32.atol, fp32.rtol, fp32.exact, fp32.min_top1, fp32.min_exit) == (1e-4, 1e-4, True, 1.0, 1.0)
    assert fp32.max_rel_err == 0.0 and fp32.decisive == DECISIVE_FACTOR
    for precision in ("fp16", "int8"):
        c = Criteria.for_precision(precision, None, None, None, None)
        assert (c.atol, c.rtol, c.exact, c.min_top1, c.min_exit) == (5e-2, 5e-2, False, 0.9, 0.9)
        assert c.max_rel_err == MAX_REL_ERR[precision]
    assert MAX_REL_ERR == {"fp32": 0.0, "fp16": 0.01, "int8": 0.2}


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_explicit_criteria_are_kept_even_when_zero(precision):
    c = Criteria.for_precision(precision, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert (c.atol, c.rtol, c.min_top1, c.min_exit, c.max_rel_err) == (0.0, 0.0, 0.0, 0.0, 0.0)
    c = Criteria.for_precision(precision, 3e-3, 2e-3, 0.5, 0.25, 0.05)
    assert (c.atol, c.rtol, c.min_top1, c.min_exit, c.max_rel_err) == (3e-3, 2e-3, 0.5, 0.25, 0.05)


# -- the numbers the checks are built on -----------------------------------------------------------------
def test_closeness_ratio_and_relative_error_values():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]], np.float32)
    got = ref + np.array([[0.0, 0.5], [0.0, -0.25]], np.float32)
    assert closeness_ratio(got, ref, 0.1, 0.1) == pytest.approx(0.5 / (0.1 + 0.1 * 4.0))
    assert closeness_ratio(got, ref, 0.1, 0.1, scale=10.0) == pytest.approx(0.5 / (10 * (0.1 + 0.4)))
    rms = np.sqrt((0.5**2 + 0.25**2) / 4)
    assert relative_logit_error(got, ref) == pytest.approx(rms / np.std(ref.astype(np.float64)))
    assert relative_logit_error(ref, ref) == 0.0
    flat = np.zeros_like(ref)  # no spread: a huge ratio (RMS / 1e-12), not nan
    assert relative_logit_error(ref, flat) == pytest.approx(np.sqrt(np.mean(ref.astype(np.float64) ** 2)) / 1e-12)


def test_top2_margin_per_row():
    logits = np.array([[1.0, 3.0, 2.5], [0.0, -1.0, 5.0]], np.float32)
    np.testing.assert_allclose(top2_margin(logits), [0.5, 5.0])
    np.testing.assert_allclose(top2_margin(np.array([[2.0, 7.0], [1.0, 1.5]])), [5.0, 0.5])  # two classes
    single = top2_margin(np.ones((3, 1)))
    assert single.shape == (3,) and np.isinf(single).all()


def test_softmax_confidence_per_row_and_stable():
    logits = np.array([[0.0, 0.0], [-1000.0, -1001.0], [2.0, 0.0]])
    expected = [0.5, 1 / (1 + np.exp(-1.0)), 1 / (1 + np.exp(-2.0))]
    np.testing.assert_allclose(softmax_confidence(logits), expected, rtol=1e-12)


# -- exit decisions --------------------------------------------------------------------------------------
def test_fp32_exit_agreement_values_and_report():
    check = checker("fp32")
    ref = np.array([0.2, 0.5, 0.9, 0.7], np.float32)
    got = np.array([0.2, 0.5, 0.9, 0.7], np.float32)
    check.exits("exit", got, ref, 0.5)  # 0.5 exits on both sides: confidence >= eta
    (c,) = check.report.checks
    assert (c.passed, c.value, c.threshold, c.metric) == (True, 1.0, 1.0, "agreement rate")
    assert c.info == {"exit_rate_onnx": 0.75, "exit_rate_torch": 0.75}


def test_fp32_exit_counts_a_confidence_equal_to_eta_as_an_exit():
    check = checker("fp32")
    ref = np.array([0.8, 0.1], np.float32)
    got = np.array([0.5, 0.1], np.float32)  # the graph's confidence is exactly eta: it exits, like torch
    check.exits("exit", got, ref, 0.5)
    assert check.report.checks[0].passed


def test_fp32_exit_disagreement_fails_unless_torch_is_at_eta():
    check = checker("fp32")
    check.exits("exit", np.array([0.49, 0.9], np.float32), np.array([0.51, 0.9], np.float32), 0.5)
    c = check.report.checks[-1]
    assert not c.passed and c.value == 0.5
    tie = np.float32(0.5)  # torch sits on eta: either decision is the model's
    check.exits("exit", np.array([0.4999999, 0.9], np.float32), np.array([tie, 0.9], np.float32), 0.5)
    assert check.report.checks[-1].passed


def test_reduced_precision_exit_counts_only_decisive_images():
    check = checker("int8")
    ref = np.array([0.1, 0.2, 0.8, 0.9, 0.5], np.float32)
    got = ref.copy()  # no error: every image off eta is decisive; the one on eta is not
    check.exits("exit", got, ref, 0.5)
    c = check.report.checks[-1]
    assert c.passed and c.metric == f"agreement where |fp32 confidence - eta| > {DECISIVE_FACTOR:g} RMS errors"
    assert c.info == {
        "exit_rate_onnx": 0.6,
        "exit_rate_torch": 0.6,
        "decisive": 4,
        "images": 5,
        "rms_confidence_err": 0.0,
    }
    many = np.tile(np.array([0.1, 0.2, 0.8, 0.9], np.float32), 25)  # 100 images, all far from eta
    noisy = many + np.float32(0.001)
    noisy[2] = 0.45  # one clear exit that the graph flips: its error (0.35) is > 4 RMS (0.14)
    check.exits("exit", noisy, many, 0.5)
    c = check.report.checks[-1]
    rms = float(np.sqrt(np.mean((noisy.astype(np.float64) - many) ** 2)))
    assert 0.03 < rms < 0.04 and c.info["rms_confidence_err"] == pytest.approx(rms, rel=1e-12)
    assert c.info["decisive"] == 100 and c.info["images"] == 100
    assert c.value == 0.99 and c.threshold == 0.9 and c.passed  # one flip in 100: within the int8 rate


# -- top-1 and patch selections --------------------------------------------------------------------------
def test_fp32_top1_agreement_rate():
    check = checker("fp32")
    ref = np.eye(4)
    got = np.eye(4)[[0, 1, 3, 3]]
    check.top1("top1", got, ref)
    c = check.report.checks[-1]
    assert (c.passed, c.value, c.metric) == (False, 0.75, "top-1 agreement rate")


def test_reduced_precision_top1_report_fields():
    check = checker("fp16")
    ref = np.array([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]])
    got = ref.copy()
    check.top1("top1", got, ref)
    c = check.report.checks[-1]
    assert c.info == {"decisive": 2, "images": 3, "rms_logit_err": 0.0, "agreement_all_images": 1.0}
    assert c.metric == f"top-1 agreement where the fp32 margin > {DECISIVE_FACTOR:g} RMS errors"


def test_patch_selection_agrees_up_to_tied_scores_only():
    score = np.array([[0.9, 0.5, 0.5, 0.1], [0.9, 0.8, 0.7, 0.1]])
    ref = np.array([[0, 1], [0, 1]])
    check = checker("fp32")
    check.patches("sel", np.array([[0, 2], [0, 1]]), ref, score)  # 1 and 2 tie in row 0
    c = check.report.checks[-1]
    assert c.passed and c.value == 1.0
    assert c.info == {"identical_rate": 0.5, "mean_set_overlap": 0.75}
    check.patches("sel", np.array([[0, 1], [0, 2]]), ref, score)  # row 1 picks a lower score
    c = check.report.checks[-1]
    assert not c.passed and c.value == 0.5 and c.metric == "selection agreement rate (up to tied scores)"
    reduced = checker("int8")
    reduced.patches("sel", np.array([[3, 2], [3, 2]]), ref, score)  # reported, never failing
    assert reduced.report.checks[-1].passed and reduced.report.checks[-1].threshold == 0.0


def test_close_reports_its_numbers():
    check = checker("fp32")
    ref = np.array([[2.0, -1.0]])
    got = ref + np.array([[1e-4, 0.0]])
    check.close("coarse_logits", got, ref, scale=1.0, logits=True)
    c = check.report.checks[-1]
    bound = 1e-4 + 1e-4 * 2.0
    assert c.passed and c.value == pytest.approx(1e-4 / bound) and c.threshold == 1.0
    assert c.metric == "max |err| / (atol + rtol max|ref|)"
    assert c.info["max_abs_err"] == pytest.approx(1e-4) and c.info["closeness_ratio"] == pytest.approx(c.value)
    assert (c.info["atol"], c.info["rtol"]) == (1e-4, 1e-4)
    check10 = checker("fp32")
    check10.close("reuse_tokens", got, ref, scale=10.0)
    assert check10.report.checks[-1].info["atol"] == pytest.approx(1e-3)
    reduced = checker("int8")
    reduced.close("tokens", ref + 100.0, ref)  # not logits: reported only
    c = reduced.report.checks[-1]
    assert c.passed and c.metric == "max |err| / (atol + rtol max|ref|), info only"


# -- validating against another checkpoint than the export's ----------------------------------------------
def test_checkpoint_warning_names_both_files_and_checksums(tmp_path):
    import hashlib
    from types import SimpleNamespace

    from exporters.validation import checkpoint_warning

    mine, other = tmp_path / "mine.pth", tmp_path / "other.pth"
    mine.write_bytes(b"weights A")
    other.write_bytes(b"weights B")
    want, have = (hashlib.sha256(p.read_bytes()).hexdigest() for p in (mine, other))
    manifest = SimpleNamespace(source={"checkpoint": {"path": "runs/mine.pth", "sha256": want}})
    assert checkpoint_warning(manifest, mine) is None
    assert checkpoint_warning(manifest, tmp_path / "missing.pth") is None
    assert checkpoint_warning(SimpleNamespace(source={}), other) is None
    assert checkpoint_warning(manifest, other) == (
        f"--checkpoint {other} (sha256 {have[:12]}…) is not the checkpoint this export was made from "
        f"(runs/mine.pth, sha256 {want[:12]}…): the checks compare the graphs with another model"
    )


# -- every field of a check row, at the bounds ------------------------------------------------------------
def test_check_rows_carry_name_input_and_batch():
    check = checker("fp32")
    ref = np.array([[2.0, -1.0]])
    check.close("a", ref, ref)
    assert (check.report.checks[-1].input, check.report.checks[-1].batch) == ("", 0)
    check.input, check.batch = "random", 8
    check.close("b", ref, ref)
    check.top1("c", ref, ref)
    check.exits("d", np.array([0.9], np.float32), np.array([0.9], np.float32), 0.5)
    check.patches("e", np.array([[0]]), np.array([[0]]), np.array([[1.0, 0.0]]))
    rows = check.report.checks[1:]
    assert [(c.name, c.input, c.batch) for c in rows] == [(n, "random", 8) for n in "bcde"]
    reduced = checker("int8")
    reduced.close("f", ref, ref, logits=True)
    reduced.close("g", ref, ref)
    reduced.top1("h", ref, ref)
    reduced.exits("i", np.array([0.9], np.float32), np.array([0.9], np.float32), 0.5)
    assert [c.name for c in reduced.report.checks] == list("fghi")


def test_fp32_closeness_at_exactly_the_bound_passes_and_just_above_fails():
    crit = Criteria(atol=0.5, rtol=0.25, exact=True, min_top1=1.0, min_exit=1.0)  # binary fractions: exact
    check = Checker(ValidationReport("e", "c", "cpu", "fp32", [1], [0.5]), crit)
    ref = np.array([[2.0, 0.0]])
    check.close("x", ref + [[1.0, 0.0]], ref)  # error 1.0 = 0.5 + 0.25 * 2: exactly the bound
    check.close("x", ref + [[1.25, 0.0]], ref)  # 1.25x the bound
    check.close("x", ref + [[2.0, 0.0]], ref, scale=2.0)  # the scale multiplies the bound: passes
    assert [(c.passed, c.value) for c in check.report.checks] == [(True, 1.0), (False, 1.25), (True, 1.0)]
    assert [c.threshold for c in check.report.checks] == [1.0, 1.0, 1.0]


def test_closeness_bound_uses_the_largest_reference_magnitude_even_below_one():
    ref = np.array([[0.5, -0.25]])
    assert closeness_ratio(ref + [[0.1, 0.0]], ref, 0.0, 0.2) == pytest.approx(0.1 / (0.2 * 0.5))


def test_reduced_precision_logits_at_exactly_the_bound_pass():
    crit = Criteria(atol=0.05, rtol=0.05, exact=False, min_top1=0.9, min_exit=0.9, max_rel_err=0.25)
    check = Checker(ValidationReport("e", "c", "int8", "int8", [1], [0.5]), crit)
    ref = np.array([[1.0, -1.0], [1.0, -1.0]])  # std exactly 1
    check.close("logits", ref + 0.25, ref, logits=True)  # RMS error exactly 0.25
    check.close("logits", ref + 0.5, ref, logits=True)
    first, second = check.report.checks
    assert (first.passed, first.value, first.threshold, first.metric) == (
        True,
        0.25,
        0.25,
        "RMS error / std of fp32 logits",
    )
    assert not second.passed and second.value == 0.5
    assert first.info["relative_rms_err"] == 0.25 and first.info["closeness_ratio"] == pytest.approx(0.25 / 0.1)


def test_reduced_precision_non_logits_are_reported_with_their_ratio():
    crit = Criteria(atol=0.5, rtol=0.25, exact=False, min_top1=0.9, min_exit=0.9, max_rel_err=0.2)
    check = Checker(ValidationReport("e", "c", "int8", "int8", [1], [0.5]), crit)
    ref = np.array([[2.0, 0.0]])
    check.close("tokens", ref + [[3.0, 0.0]], ref)  # 3x the bound: reported, not judged
    c = check.report.checks[-1]
    assert (c.passed, c.value, c.threshold) == (True, 3.0, 1.0) and c.info["max_abs_err"] == 3.0


def test_default_scale_is_one():
    check = checker("fp32")
    ref = np.array([[2.0, 0.0]])
    bound = 1e-4 + 1e-4 * 2.0
    check.close("logits", ref + [[1.5 * bound, 0.0]], ref)
    assert not check.report.checks[-1].passed and check.report.checks[-1].value == pytest.approx(1.5)


def test_precisions_without_their_own_bound_get_the_int8_bound():
    assert Criteria.for_precision("optimized", None, None, None, None).max_rel_err == 0.2


def test_an_empty_decisive_set_is_a_full_agreement():
    check = checker("int8")
    ref = np.array([[1.0, 1.0]])  # no margin at all: no decisive image
    check.top1("t", ref + [[0.1, -0.1]], ref)
    c = check.report.checks[-1]
    assert c.passed and c.value == 1.0 and c.info["decisive"] == 0


def test_reduced_precision_top1_rms_value():
    check = checker("int8")
    ref = np.array([[10.0, 0.0], [0.0, 10.0]])
    got = ref + np.array([[0.5, -0.5], [0.0, 1.0]])
    check.top1("t", got, ref)
    assert check.report.checks[-1].info["rms_logit_err"] == pytest.approx(np.sqrt((0.25 + 0.25 + 0 + 1) / 4))


@pytest.mark.parametrize(
    "scores, same",
    [
        ([1.0, 1.000005], False),  # relative difference 5e-6: above rtol 1e-6, a different patch
        ([1.0, 1.0000005], True),  # 5e-7: a tie
        ([0.0, 5e-9], False),  # near zero: above atol 1e-9
        ([0.0, 5e-10], True),
    ],
)
def test_patch_score_ties_use_tight_tolerances(scores, same):
    check = checker("fp32")
    score = np.array([[scores[0], scores[1], -1.0]])
    check.patches("sel", np.array([[1]]), np.array([[0]]), score)
    assert check.report.checks[-1].passed is same
