"""ALGORITHM.md §5 metrics, checked against the paper's own tables (Tables 1, 2, 6, 7-14)."""

import math

import numpy as np
import pytest

from mage_cl import metrics
from mage_cl.metrics import round_half_up

# Tables 7-14: accuracy after each stage (rows) on each task (columns VQAv2, ImageNet,
# Flickr30k, OCRVQA, RefCOCO, HQEdit), with the paper's Avg.ACC column last.
PAPER_STAGES = {
    "MAGE": """62.10 62.10
               43.56 68.35 55.96
               41.25 78.37 31.26 50.29
               57.29 75.18 32.02 37.09 50.40
               55.84 70.56 31.75 34.10 68.74 52.20
               45.42 68.02 31.44 27.28 34.10 91.19 49.58""",
    "LoRA": """59.68 59.68
               20.10 65.19 42.65
               18.94 78.80 31.18 42.97
               50.26 71.32 31.26 41.22 48.52
               36.75 66.43 30.94 29.28 66.60 46.00
               18.40 61.01 30.60 19.38 32.70 91.27 42.23""",
    "MoELoRA": """62.10 62.10
                  33.83 82.16 58.00
                  28.74 85.86 31.46 48.69
                  56.37 76.95 31.99 21.52 46.71
                  42.81 68.53 31.21 18.15 70.00 46.14
                  25.32 63.57 30.59 16.04 36.32 91.54 43.90""",
    "EWC": """59.68 59.68
              41.94 73.29 57.62
              41.92 89.41 31.11 54.15
              53.46 82.48 32.21 37.50 51.41
              47.98 67.31 32.15 29.47 68.40 49.06
              40.44 61.07 30.49 18.64 40.08 91.30 47.00""",
    "LAE": """59.68 59.68
              42.28 77.49 59.89
              40.50 88.81 31.18 53.50
              55.50 83.29 32.04 27.48 49.58
              42.36 79.53 31.87 26.28 65.72 49.15
              21.56 70.71 30.63 28.54 28.68 91.39 45.25""",
    "PGP": """59.68 59.68
              43.11 78.20 60.66
              41.83 83.56 31.40 52.26
              52.98 81.59 31.88 19.96 46.60
              45.45 77.76 30.32 18.40 73.20 49.03
              38.08 74.14 30.82 18.08 33.64 91.43 47.70""",
    "CIA": """59.68 59.68
              45.66 68.95 57.31
              40.98 79.12 31.08 50.39
              51.33 77.38 31.50 41.06 50.32
              42.79 72.27 30.89 35.29 70.28 50.30
              28.40 68.91 30.49 31.00 37.78 91.36 47.99""",
    "RegLoRA": """59.68 59.68
                  45.23 73.31 59.27
                  40.41 80.47 31.29 50.72
                  52.17 70.72 32.06 36.92 47.97
                  45.43 65.61 31.39 30.68 66.82 47.99
                  40.34 61.10 30.42 25.72 35.18 91.60 47.39""",
}

# Table 1 / Table 6: Avg.ACC, Forgetting, New.ACC.
PAPER_OVERALL = {
    "LoRA": (42.23, 20.36, 59.19),
    "MoELoRA": (43.90, 19.08, 59.80),
    "EWC": (47.00, 15.85, 60.21),
    "LAE": (45.25, 16.29, 58.82),
    "PGP": (47.70, 13.54, 58.97),
    "CIA": (47.99, 14.89, 60.40),
    "RegLoRA": (47.39, 15.05, 59.94),
    "MAGE": (49.58, 12.26, 59.79),
}

# Table 2: Avg.IUF, Avg.HAL, Avg.OTH (they must add up to the method's Forgetting).
# The one paper number the mean of its own rounded table cells does not reproduce: PGP's
# diagonal 59.68 78.20 31.40 19.96 73.20 91.43 averages 58.9783 -> 58.98, the paper prints
# 58.97 (computed from its unrounded accuracies). Checked to within 0.01 instead of exactly.
PAPER_ROUNDING_EXCEPTIONS = {("PGP", "New.ACC")}

PAPER_ERROR_TYPES = {"LoRA": (9.07, 11.11, 0.18), "MoELoRA": (8.47, 10.53, 0.08), "MAGE": (4.42, 7.48, 0.36)}


def _parse(table: str):
    """(lower-triangular matrix with None above the diagonal, paper's per-stage Avg.ACC column)."""
    rows = [[float(v) for v in line.split()] for line in table.strip().splitlines()]
    T = len(rows)
    matrix = [r[:-1] + [None] * (T - len(r) + 1) for r in rows]
    return matrix, [r[-1] for r in rows]


def test_lora_and_mage_headline_numbers():
    """The numbers ALGORITHM.md §5 quotes: LoRA 42.23 / 59.19 / 20.36, MAGE 49.58 / 59.79 / 12.26."""
    lora, _ = _parse(PAPER_STAGES["LoRA"])
    assert lora[-1] == [18.40, 61.01, 30.60, 19.38, 32.70, 91.27]
    assert [lora[i][i] for i in range(6)] == [59.68, 65.19, 31.18, 41.22, 66.60, 91.27]
    assert round_half_up(metrics.avg_acc(lora)) == 42.23
    assert round_half_up(metrics.new_acc(lora)) == 59.19
    assert round_half_up(metrics.forgetting(lora)) == 20.36
    mage, _ = _parse(PAPER_STAGES["MAGE"])
    assert round_half_up(metrics.avg_acc(mage)) == 49.58
    assert round_half_up(metrics.new_acc(mage)) == 59.79
    assert round_half_up(metrics.forgetting(mage)) == 12.26


@pytest.mark.parametrize("method", sorted(PAPER_STAGES))
def test_every_method_overall_results(method):
    matrix, _ = _parse(PAPER_STAGES[method])
    got = metrics.summarize(matrix)
    want = dict(zip(("Avg.ACC", "Forgetting", "New.ACC"), PAPER_OVERALL[method]))
    for key, value in want.items():
        if (method, key) in PAPER_ROUNDING_EXCEPTIONS:
            assert abs(got[key] - value) <= 0.01 + 1e-9, (key, got[key])
        else:
            assert round_half_up(got[key]) == value, (key, got[key])
    assert math.isnan(got["Avg.IUF"])  # no error-rate matrices given


@pytest.mark.parametrize("method", sorted(PAPER_STAGES))
def test_per_stage_avg_acc_column(method):
    """The Avg.ACC column of Tables 7-14 (e.g. LoRA 59.68, 42.65, 42.97, 48.52, 46.00, 42.23)."""
    matrix, column = _parse(PAPER_STAGES[method])
    assert [round_half_up(v) for v in metrics.stage_avg_acc(matrix)] == column
    # also for a run still in progress (first k stages only)
    assert [round_half_up(v) for v in metrics.stage_avg_acc(matrix[:3])] == column[:3]


def test_paper_rounding_is_half_up():
    # LoRA stage 2: (20.10 + 65.19) / 2 = 42.645 -> 42.65 (banker's rounding would give 42.64)
    assert round_half_up((20.10 + 65.19) / 2) == 42.65
    assert round_half_up(49.575) == 49.58
    assert round_half_up(-0.125) == -0.13
    assert round_half_up(1.004999) == 1.0


@pytest.mark.parametrize("method", sorted(PAPER_ERROR_TYPES))
def test_paper_error_types_add_up_to_forgetting(method):
    matrix, _ = _parse(PAPER_STAGES[method])
    assert round_half_up(sum(PAPER_ERROR_TYPES[method])) == round_half_up(metrics.forgetting(matrix))


def test_forgetting_is_sum_of_error_type_averages_on_synthetic_runs():
    """Every wrong answer is exactly one type: acc + iuf + hal + oth = 100 per cell."""
    rng = np.random.default_rng(7)
    for T in (2, 4, 6):
        counts = rng.multinomial(50, [0.4, 0.2, 0.3, 0.1], size=(T, T))  # correct, IUF, HAL, OTH
        rates = 100.0 * counts / 50
        acc, iuf, hal, oth = (rates[..., k].tolist() for k in range(4))
        for j in range(T):  # not-yet-trained cells are None / NaN and must be ignored
            for i in range(j + 1, T):
                acc[j][i], iuf[j][i], hal[j][i], oth[j][i] = None, float("nan"), None, 123.0
        s = metrics.summarize(acc, iuf, hal, oth)
        assert s["Forgetting"] == pytest.approx(s["Avg.IUF"] + s["Avg.HAL"] + s["Avg.OTH"], abs=1e-9)
        # the formulas themselves, written out
        a = rates[..., 0]
        assert s["Forgetting"] == pytest.approx(np.mean([a[i, i] - a[T - 1, i] for i in range(T - 1)]))
        assert s["Avg.HAL"] == pytest.approx(
            np.mean([rates[T - 1, i, 2] - rates[i, i, 2] for i in range(T - 1)]))
        assert s["Avg.ACC"] == pytest.approx(np.mean(a[T - 1]))
        assert s["New.ACC"] == pytest.approx(np.mean(np.diag(a)))
        assert set(s) == set(metrics.SUMMARY_KEYS)


def test_stage_forgetting():
    matrix, _ = _parse(PAPER_STAGES["LoRA"])
    stages = metrics.stage_forgetting(matrix)
    assert stages[0] == 0.0
    assert stages[1] == pytest.approx(59.68 - 20.10)
    assert stages[-1] == pytest.approx(metrics.forgetting(matrix))


def test_single_task_has_no_forgetting():
    assert metrics.summarize([[70.0]], [[10.0]], [[20.0]], [[0.0]]) == {
        "Avg.ACC": 70.0, "Forgetting": 0.0, "New.ACC": 70.0, "Avg.IUF": 0.0, "Avg.HAL": 0.0, "Avg.OTH": 0.0}


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([[50.0, None], [40.0]], "different lengths"),
    ([[50.0, None]], "square"),
    ([[50.0, None], [None, 30.0]], r"\[1\]\[0\]"),
    ([[50.0, None], [float("nan"), 30.0]], "finite"),
    ([[150.0, None], [40.0, 30.0]], "outside"),
])
def test_bad_matrices_are_rejected_with_the_cell_named(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.summarize(bad)


def test_error_matrix_shape_must_match():
    with pytest.raises(ValueError, match="Avg.HAL"):
        metrics.summarize([[50.0, None], [40.0, 30.0]], hal=[[1.0]])
