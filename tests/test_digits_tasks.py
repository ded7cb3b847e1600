"""The embedded six-task digits benchmark, its judges and error typing (mage_cl.tasks.digits)."""

import re

import numpy as np
import pytest

from mage_cl.error_types import DIGIT_WORDS, box_iou, parse_bbox
from mage_cl.tasks import ORDERS, PAPER_NAMES, PRESETS, TASK_NAMES, build_tasks, order_names
from mage_cl.tasks.digits import (DIGIT_SHAPE, EDIT_MAX_MEAN_ABS_DIFF, EDIT_OPS, GROUNDING_CANVAS,
                                  OCR_SHAPE, EditJudge, describe_example, global_split,
                                  load_digit_levels)
from mage_cl.tasks.judge_classifier import get_judge
from mage_cl.vocab import Vocab

V = Vocab()


@pytest.fixture(scope="module")
def tasks():
    return build_tasks("smoke", seed=0, vocab=V)


def _image_in_prompt(example, shape):
    """The level map between BOI and EOI of a prompt (BOS BOI ... EOI text SEP)."""
    n = shape[0] * shape[1] + 2
    img = V.decode_image(example.prompt[1:1 + n], shape)
    assert img is not None
    return img, V.decode_text(example.prompt[1 + n:-1])


def test_names_modalities_and_sizes(tasks):
    assert list(tasks) == list(TASK_NAMES)
    spec = {  # ALGORITHM.md §1 table
        "vqa": ({"image", "text"}, "text"), "classification": ({"image", "text"}, "text"),
        "generation": ({"text"}, "image"), "ocr": ({"image", "text"}, "text"),
        "grounding": ({"image", "text"}, "text"), "editing": ({"image", "text"}, "image"),
    }
    for name, task in tasks.items():
        assert task.name == name and task.paper_name == PAPER_NAMES[name]
        assert (set(task.inputs), task.output) == spec[name]
        assert (len(task.train), len(task.test)) == PRESETS["smoke"]
        for ex in task.train + task.test:
            assert ex.prompt[0] == V.bos_id and ex.prompt[-1] == V.sep_id and ex.target[-1] == V.eos_id
            assert len(ex.prompt) <= 170 and max(ex.prompt + ex.target) < V.size
            assert len(ex.target) <= task.max_new_tokens


def test_paper_names_and_orders():
    assert [PAPER_NAMES[n] for n in ORDERS["default"]] == [
        "VQAv2", "ImageNet", "Flickr30k", "OCRVQA", "RefCOCO", "HQEdit"]
    assert ORDERS["reverse"] == ORDERS["default"][::-1]
    assert [PAPER_NAMES[n] for n in order_names("alphabetical")] == [
        "Flickr30k", "HQEdit", "ImageNet", "OCRVQA", "RefCOCO", "VQAv2"]
    with pytest.raises(ValueError, match="alphabetical, default, reverse"):
        order_names("random")
    with pytest.raises(ValueError, match="smoke"):
        build_tasks("huge")


def test_build_is_deterministic_and_seeded(tasks):
    again = build_tasks("smoke", seed=0, vocab=V)
    other = build_tasks("smoke", seed=1, vocab=V)
    for name in TASK_NAMES:
        assert [(e.prompt, e.target) for e in again[name].train + again[name].test] == \
               [(e.prompt, e.target) for e in tasks[name].train + tasks[name].test]
        assert [e.prompt for e in other[name].test] != [e.prompt for e in tasks[name].test]


def test_presets_sizes():
    cpu = build_tasks("cpu", seed=0, vocab=V)
    assert all((len(t.train), len(t.test)) == (1000, 300) for t in cpu.values())
    gpu = build_tasks("gpu", seed=0, vocab=V)
    train_idx, test_idx = global_split(0)
    assert all((len(t.train), len(t.test)) == (len(train_idx), len(test_idx)) for t in gpu.values())


def test_global_split_is_disjoint_stratified_and_respected(tasks):
    images, labels = load_digit_levels(V)
    train_idx, test_idx = global_split(0)
    assert len(set(train_idx) & set(test_idx)) == 0 and len(train_idx) + len(test_idx) == 1797
    frac = np.bincount(labels[test_idx], minlength=10) / np.bincount(labels, minlength=10)
    assert np.all(np.abs(frac - 0.25) < 0.01)
    assert not np.array_equal(global_split(1)[1], test_idx)
    train_set, test_set = set(train_idx.tolist()), set(test_idx.tolist())
    for task in tasks.values():
        for part, allowed in ((task.train, train_set), (task.test, test_set)):
            for ex in part:
                assert set(ex.meta["image_ids"]) <= allowed, (task.name, ex.meta["image_ids"])
    # the metadata is truthful: the prompt images are the named source images
    for ex in tasks["classification"].test + tasks["vqa"].train + tasks["editing"].test:
        img, _ = _image_in_prompt(ex, DIGIT_SHAPE)
        np.testing.assert_array_equal(img, images[ex.meta["image_ids"][0]])
    for ex in tasks["ocr"].test:
        img, _ = _image_in_prompt(ex, OCR_SHAPE)
        a, b = ex.meta["image_ids"]
        np.testing.assert_array_equal(img, np.concatenate([images[a], images[b]], axis=1))
    for ex in tasks["generation"].test:
        np.testing.assert_array_equal(V.decode_image(ex.target[:-1], DIGIT_SHAPE), images[ex.meta["image_ids"][0]])


def test_answers_are_right(tasks):
    """Recompute every answer from the source labels and the question text."""
    _, labels = load_digit_levels(V)
    for ex in tasks["vqa"].train + tasks["vqa"].test:
        y = int(labels[ex.meta["image_ids"][0]])
        q = _image_in_prompt(ex, DIGIT_SHAPE)[1]
        k = [int(t) for t in re.findall(r"\d+", q)]
        want = {"is the digit even?": lambda: "yes" if y % 2 == 0 else "no"}.get(q)
        if want:
            want = want()
        elif q.startswith("is the digit greater than"):
            want = "yes" if y > k[0] else "no"
        elif q.startswith("what is the digit plus"):
            want = str(y + k[0])
        else:
            assert q.startswith("is it a ")
            want = "yes" if y == k[0] else "no"
        assert V.decode_text(ex.target[:-1]) == want == ex.meta["answer"]
    kinds = {_image_in_prompt(ex, DIGIT_SHAPE)[1].split(" ")[3] for ex in tasks["vqa"].train}
    assert len(kinds) >= 3  # several question kinds
    for ex in tasks["classification"].test:
        assert V.decode_text(ex.target[:-1]) == DIGIT_WORDS[labels[ex.meta["image_ids"][0]]]
    for ex in tasks["ocr"].test:
        a, b = ex.meta["image_ids"]
        assert V.decode_text(ex.target[:-1]) == f"{labels[a]}{labels[b]}"
    gen_classes = [ex.meta["label"] for ex in tasks["generation"].test]
    assert np.bincount(gen_classes, minlength=10).min() >= 1  # 16 prompts cover all ten digits
    from mage_cl.tasks.digits import GENERATION_TEMPLATES

    used = set()
    for ex in tasks["generation"].train + tasks["generation"].test:
        text = V.decode_text(ex.prompt[1:-1])
        forms = [t for t in GENERATION_TEMPLATES if t.format(DIGIT_WORDS[ex.meta["label"]]) == text]
        assert len(forms) == 1, text  # exactly one wording, naming the example's digit
        used.add(forms[0])
        assert labels[ex.meta["image_ids"][0]] == ex.meta["label"]
    assert used == set(GENERATION_TEMPLATES)
    for ex in tasks["editing"].test:
        src, instr = _image_in_prompt(ex, DIGIT_SHAPE)
        np.testing.assert_array_equal(V.decode_image(ex.target[:-1], DIGIT_SHAPE), EDIT_OPS[instr](src, V.levels))


def test_grounding_box_covers_the_named_digit_only(tasks):
    _, labels = load_digit_levels(V)
    H, W = GROUNDING_CANVAS
    for ex in tasks["grounding"].train + tasks["grounding"].test:
        canvas, q = _image_in_prompt(ex, GROUNDING_CANVAS)
        a, b = ex.meta["image_ids"]
        assert q == f"where is the {DIGIT_WORDS[labels[a]]}?" and labels[a] != labels[b]
        x1, y1, x2, y2 = parse_bbox(V.decode_text(ex.target[:-1]))
        r0, r1, c0, c1 = round(y1 * H), round(y2 * H), round(x1 * W), round(x2 * W)
        inside = canvas[r0:r1, c0:c1]
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()  # tight
        outside = canvas.copy()
        outside[r0:r1, c0:c1] = 0
        assert outside.any()  # the distractor lies elsewhere
        # the distractor's tight box does not overlap the answer (a wrong pick scores IoU 0)
        rows, cols = np.nonzero(outside)
        other = (cols.min() / W, rows.min() / H, (cols.max() + 1) / W, (rows.max() + 1) / H)
        assert box_iou(other, (x1, y1, x2, y2)) == 0.0


def test_every_target_is_judged_correct(tasks):
    for name, task in tasks.items():
        verdicts = [task.judge(ex.target[:-1], ex) for ex in task.train + task.test]
        if name == "generation":  # the judge classifier misreads a few real digits (~96% accurate)
            assert np.mean([v.correct for v in verdicts]) >= 0.9
        else:
            assert all(v.correct and v.error is None for v in verdicts), name


def _text(s):
    return V.encode_text(s)


def test_text_task_error_types(tasks):
    vqa = tasks["vqa"]
    num_q = next(e for e in vqa.test if e.meta["form"] == "number")
    yn_q = next(e for e in vqa.test if e.meta["form"] == "yes_no")
    wrong_num = str(int(num_q.meta["answer"]) + 1)
    assert vqa.judge(_text(wrong_num), num_q).error == "HAL"
    assert vqa.judge(_text("yes"), num_q).error == "IUF"  # no number where a number is asked
    assert vqa.judge(_text("4"), yn_q).error == "IUF"
    assert vqa.judge(_text({"yes": "no", "no": "yes"}[yn_q.meta["answer"]]), yn_q).error == "HAL"
    assert vqa.judge([], yn_q).error == "OTH"
    assert vqa.judge(_text("yesyesyesyes"), yn_q).error == "OTH"  # repetition loop
    assert vqa.judge(V.encode_image(np.ones((8, 8), int)), yn_q).error == "IUF"  # image where text asked
    assert vqa.judge(_text(yn_q.meta["answer"]) + [V.sep_id], yn_q).error == "IUF"
    assert vqa.judge(_text(" " + yn_q.meta["answer"] + " "), yn_q).correct  # surrounding spaces ignored

    cls = tasks["classification"]
    ex = cls.test[0]
    other = DIGIT_WORDS[(DIGIT_WORDS.index(ex.meta["answer"]) + 1) % 10]
    assert cls.judge(_text(other), ex).error == "HAL"
    assert cls.judge(_text(str(DIGIT_WORDS.index(ex.meta["answer"]))), ex).error == "IUF"

    ocr = tasks["ocr"]
    ex = ocr.test[0]
    assert ocr.judge(_text(ex.meta["answer"][::-1] if ex.meta["answer"][0] != ex.meta["answer"][1] else "100"),
                     ex).error == "HAL"
    assert ocr.judge(_text("seven"), ex).error == "IUF"


def test_grounding_judge_uses_iou(tasks):
    g = tasks["grounding"]
    ex = g.test[0]
    x1, y1, x2, y2 = ex.meta["bbox"]
    w, h = x2 - x1, y2 - y1
    near = (x1 + 0.1 * w, y1, x2 + 0.1 * w, y2)  # IoU = 0.9 / 1.1 > 0.5
    far = (x1 + 0.7 * w, y1, x2 + 0.7 * w, y2)  # IoU = 0.3 / 1.7 < 0.5
    fmt = lambda b: "[" + ",".join(f"{v:.2f}" for v in b) + "]"
    assert box_iou(near, ex.meta["bbox"]) > 0.5 > box_iou(far, ex.meta["bbox"])
    assert g.judge(_text(fmt(near)), ex).correct
    assert g.judge(_text(fmt(far)), ex).error == "HAL"
    assert g.judge(_text("[0.1,0.2,0.3]"), ex).error == "IUF"  # not a box
    assert g.judge(_text("left"), ex).error == "IUF"
    # always answering the box of the middle of the canvas is mostly wrong
    center = [g.judge(_text("[0.25,0.25,0.75,0.75]"), e).correct for e in g.test]
    assert np.mean(center) < 0.5


def test_generation_judge(tasks):
    gen = tasks["generation"]
    judge = get_judge(0, V)
    images, labels = load_digit_levels(V)
    train_idx, _ = global_split(0)
    ex = gen.test[0]
    y = ex.meta["label"]
    good = next(i for i in train_idx if labels[i] == y and judge.predict(images[i]) == y)
    bad = next(i for i in train_idx if labels[i] != y and judge.predict(images[i]) == labels[i])
    assert gen.judge(V.encode_image(images[good]), ex).correct
    assert gen.judge(V.encode_image(images[bad]), ex).error == "HAL"
    assert gen.judge(V.encode_image(np.zeros((8, 8), int)), ex).error == "HAL"  # blank: not a drawing
    assert gen.judge(V.encode_image(images[good])[:40], ex).error == "OTH"  # truncated image
    assert gen.judge(V.encode_image(images[good][:, :4]), ex).error == "OTH"  # wrong size
    assert gen.judge(_text(DIGIT_WORDS[y]), ex).error == "IUF"  # text where an image is asked
    assert gen.judge([], ex).error == "OTH"


def test_editing_judge_threshold_separates_edits_from_non_edits(tasks):
    """The calibrated rule: exact target passes; the unedited input and random images fail."""
    ed = tasks["editing"]
    rng = np.random.default_rng(0)
    images, _ = load_digit_levels(V)
    _, test_idx = global_split(0)
    copies, randoms, other_edits = [], [], []
    for ex in ed.test:
        src, instr = _image_in_prompt(ex, DIGIT_SHAPE)
        copies.append(ed.judge(V.encode_image(src), ex).correct)
        other_edits += [ed.judge(V.encode_image(op(src, V.levels)), ex).correct
                        for name, op in EDIT_OPS.items() if name != instr]
        randoms.append(ed.judge(V.encode_image(images[rng.choice(test_idx)]), ex).correct)
        target = ex.meta["target_image"]
        noisy = target.copy()
        flip = rng.choice(64, size=8, replace=False)
        noisy.flat[flip] = np.where(noisy.flat[flip] > 0, noisy.flat[flip] - 1, 1)  # 8 pixels off by one
        assert EditJudge(V, get_judge(0, V)).distance(noisy, target) <= EDIT_MAX_MEAN_ABS_DIFF
    assert np.mean(copies) <= 0.15 and not any(randoms)
    assert np.mean(other_edits) <= 0.05  # the instruction decides the output: a wrong edit fails
    ex = ed.test[0]
    assert ed.judge(ex.target[:-2], ex).error == "OTH"  # image without EOI
    assert ed.judge(_text("shift it down."), ex).error == "IUF"
    assert ed.judge(V.encode_image(np.zeros((8, 8), int) + 4), ex).error == "HAL"


def test_judge_classifier_is_accurate_cached_and_train_only():
    judge = get_judge(0, V)
    assert judge is get_judge(0, V)
    assert judge.accuracy >= 90.0  # on the held-out test images
    images, labels = load_digit_levels(V)
    _, test_idx = global_split(0)
    assert judge.accuracy == pytest.approx(100 * np.mean(judge.predict_batch(images[test_idx]) == labels[test_idx]))
    with pytest.raises(ValueError, match="8, 8"):
        judge.predict(np.zeros((8, 16), int))


def test_describe_example(tasks):
    text = describe_example(tasks["editing"], tasks["editing"].test[0], V)
    assert "<image 64 px>" in text and text.count("\n") >= 9  # prompt, target and an 8-row picture


def test_error_type_helpers():
    from mage_cl.error_types import is_number, is_repetition_loop, type_text_answer

    assert parse_bbox("[0.25,0.50,0.75,1.00]") == (0.25, 0.5, 0.75, 1.0)
    assert parse_bbox(" [ 0.1 , 0.2,0.3, 0.4 ] ") == (0.1, 0.2, 0.3, 0.4)
    assert parse_bbox("[0.1,0.2,0.3]") is None and parse_bbox("0.1,0.2,0.3,0.4") is None
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0 and box_iou((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0
    assert is_number("10") and is_number("-3") and not is_number("1o") and not is_number("")
    assert is_repetition_loop("yesyesyesyes") and is_repetition_loop("77777777") and is_repetition_loop("abababab")
    assert not is_repetition_loop("100") and not is_repetition_loop("seven") and not is_repetition_loop("111")
    assert type_text_answer("  ", is_number) == "OTH"
    assert type_text_answer("five", is_number) == "IUF" and type_text_answer("5", is_number) == "HAL"


def test_error_rates_partition_the_test_set():
    from mage_cl.error_types import error_rates

    r = error_rates([None, "IUF", "HAL", "HAL", None, "OTH", None, None])
    assert r == {"ACC": 50.0, "IUF": 12.5, "HAL": 25.0, "OTH": 12.5}
    with pytest.raises(ValueError, match="no verdicts"):
        error_rates([])


def test_shift_edits_move_pixels_and_blank_the_vacated_border():
    from mage_cl.tasks.digits import _shift

    im = np.random.default_rng(3).integers(1, V.levels, size=DIGIT_SHAPE)
    right, down = EDIT_OPS["shift it right."](im, V.levels), EDIT_OPS["shift it down."](im, V.levels)
    np.testing.assert_array_equal(right[:, 2:], im[:, :-2])
    np.testing.assert_array_equal(down[2:], im[:-2])
    assert not right[:, :2].any() and not down[:2].any()
    np.testing.assert_array_equal(_shift(im, 1, -1)[1:, :-1], im[:-1, 1:])  # negative: up / left
    assert not _shift(im, 1, -1)[0].any() and not _shift(im, 1, -1)[:, -1].any()
    assert not _shift(im, 8, 0).any()
