"""The per-stage plots (``results.stage_plot``): axis titles, fixed accuracy axis, the bounds as reference lines."""

import warnings

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from mage_cl import metrics, results  # noqa: E402

NAMES = ["VQAv2", "ImageNet", "Flickr30k"]


def _sequential(method, rows):
    acc = [list(r) + [None] * (len(NAMES) - len(r)) for r in rows]
    stage = [sum(r) / len(r) for r in rows]
    return {"method": method, "paper_names": NAMES, "joint": False, "acc": acc, "stage_avg_acc": stage,
            "metrics": metrics.summarize(acc, acc, acc, acc)}


def _bound(method, avg):
    return {"method": method, "paper_names": NAMES, "joint": True, "acc": [[avg] * 3], "stage_avg_acc": None,
            "metrics": {"Avg.ACC": avg}}


@pytest.fixture
def saved(monkeypatch):
    """The figures ``stage_plot`` saves (inspected after it closes them)."""
    figs = []
    orig = Figure.savefig

    def keep(self, *a, **kw):
        figs.append(self)
        return orig(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figs


def test_avg_acc_plot_has_titles_a_0_100_axis_and_one_reference_line_per_bound(tmp_path, saved):
    records = [_sequential("lora", [[50.0], [10.0, 80.0], [0.0, 5.0, 40.0]]),
               _sequential("mage", [[45.0], [30.0, 70.0], [20.0, 40.0, 30.0]]),
               _bound("multitask", 55.0), _bound("multitask-sqrt", 70.0)]
    results.stage_plot(tmp_path / "a.png", records)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    ax = saved[-1].axes[0]
    assert ax.get_xlabel() and "Avg.ACC" in ax.get_ylabel()
    assert ax.get_ylim() == (0.0, 100.0)  # all-low data does not rescale it
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["lora"].get_ydata()) == pytest.approx([50.0, 45.0, 15.0])
    flat = {k: tuple(ln.get_ydata()) for k, ln in lines.items() if "upper bound" in k}
    assert flat == {"multitask (upper bound)": (55.0, 55.0), "multitask-sqrt (upper bound)": (70.0, 70.0)}
    assert lines["multitask (upper bound)"].get_linestyle() != lines["multitask-sqrt (upper bound)"].get_linestyle()


def test_a_plot_of_bounds_only_says_so_instead_of_an_empty_legend(tmp_path, saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "No artists with labels found to put in legend"
        results.stage_plot(tmp_path / "f.png", [_bound("multitask-sqrt", 70.0)], "Forgetting")
    ax = saved[-1].axes[0]
    assert ax.get_legend() is None
    assert [t.get_text() for t in ax.texts] == ["no method with stages in this comparison"]
    assert ax.get_ylabel() and ax.get_ylim()[1] == 100.0
