"""The base model's pretraining mixture: train-only, answer forms without task mappings."""

import random

import numpy as np
import pytest

from mage_cl.error_types import DIGIT_WORDS
from mage_cl.model import (FORMAT_FRACTION, PLAIN_FRACTION, _format_prior, _generic_instruction, _ink_box,
                           _runs, pretrain_corpus)
from mage_cl.tasks import build_tasks
from mage_cl.vocab import BOS, SEP, Vocab

V = Vocab()


@pytest.fixture(scope="module")
def tasks():
    return build_tasks("cpu", seed=0, vocab=V)


def _answer(seq):
    return seq[seq.index(V.sep_id) + 1:]


def _pixels(ids):
    return tuple(t for t in ids if V.is_image_token(t))


def test_corpus_is_deterministic_and_seeded(tasks):
    sets = [t.train for t in tasks.values()]
    a = pretrain_corpus(V, sets, 400, seed=0)
    assert a == pretrain_corpus(V, sets, 400, seed=0)
    assert a != pretrain_corpus(V, sets, 400, seed=1)
    assert len(a) == 400


def test_corpus_uses_training_images_only(tasks):
    train_runs = {tuple(r) for t in tasks.values() for e in t.train
                  for r in _runs(list(e.prompt) + list(e.target), V.is_image_token)}
    test_runs = {tuple(r) for t in tasks.values() for e in t.test
                 for r in _runs(list(e.prompt) + list(e.target), V.is_image_token)}
    off, top = V.image_offset, V.image_offset + V.levels - 1
    synthetic = {tuple([off + lvl] * 64) for lvl in range(V.levels)}
    synthetic.add(tuple(top if r in (0, 7) or c in (0, 7) else off for r in range(8) for c in range(8)))
    shapes = {64: 8, 128: 16, 144: 12}  # run length -> row width
    top_halves = {tuple(r[: (len(r) // shapes[len(r)] // 2) * shapes[len(r)]])
                  + (off,) * (len(r) - (len(r) // shapes[len(r)] // 2) * shapes[len(r)]) for r in train_runs}
    blanks = {(off,) * n for n in shapes}
    corpus = pretrain_corpus(V, [t.train for t in tasks.values()], 2000, seed=0)
    seen = {tuple(r) for s in corpus for r in _runs(s, V.is_image_token)}
    assert seen <= train_runs | synthetic | top_halves | blanks
    assert not (seen & (test_runs - train_runs))


def test_format_prior_keeps_the_form_and_drops_the_content(tasks):
    names = list(tasks)
    sets = [tasks[n].train for n in names]
    seqs = _format_prior(V, random.Random(0), sets, 3000)
    assert len(seqs) == 3000
    prompts = {tuple(e.prompt): (n, e) for n in names for e in tasks[n].train}
    sources = {_pixels(e.prompt) for n in names for e in tasks[n].train if len(_pixels(e.prompt)) == 64}
    agree, total, per_task = 0, 0, {n: 0 for n in names}
    for s in seqs:
        k = s.index(V.sep_id) + 1
        name, ex = prompts[tuple(s[:k])]  # every sequence starts with a real training prompt
        per_task[name] += 1
        ans = s[k:]
        assert ans[-1] == V.eos_id
        if tasks[name].output == "image":
            assert ans[0] == V.boi_id and ans[-2] == V.eoi_id
            assert _pixels(ans) in sources  # an unedited training digit, never an edit target
        else:
            same_form = {tuple(e.target) for e in tasks[name].train if e.meta.get("form") == ex.meta.get("form")}
            assert tuple(ans) in same_form
        if name == "classification":
            total += 1
            agree += V.decode_text(ans[:-1]) == DIGIT_WORDS[ex.meta["label"]]
    assert min(per_task.values()) > 300  # every task's form is taught
    # the answer ignores the image: the class word matches the digit at chance (1 in 10)
    assert total > 300 and agree / total < 0.2


def test_fractions_of_the_mixture(tasks):
    corpus = pretrain_corpus(V, [t.train for t in tasks.values()], 1000, seed=0)
    prompts = {tuple(e.prompt) for t in tasks.values() for e in t.train}
    fmt = sum(1 for s in corpus if V.sep_id in s and tuple(s[: s.index(V.sep_id) + 1]) in prompts)
    plain = sum(1 for s in corpus if V.sep_id not in s)
    assert fmt == round(FORMAT_FRACTION * 1000)
    assert plain == round(PLAIN_FRACTION * 1000)


def test_generic_instructions_answer_in_the_asked_form(tasks):
    runs = [r for t in tasks.values() for e in t.train for r in _runs(list(e.prompt), V.is_image_token)]
    rng = random.Random(0)
    seen = set()
    for _ in range(600):
        s = _generic_instruction(V, rng, runs, ["seven", "digit", "where"])
        assert s[0] == BOS and SEP in s
        k = s.index(SEP)
        q = V.decode_text([t for t in s[:k] if not V.is_image_token(t) and t not in (V.boi_id, V.eoi_id, BOS)])
        a = _answer(s)[:-1]
        seen.add(q.split(" ")[0])
        if q.startswith(("is ", "does ")):
            assert V.decode_text(a) in ("yes", "no")
        elif q.startswith("how many"):
            assert V.decode_text(a).isdigit()
        elif q.startswith(("draw", "copy", "make", "keep")):
            assert a[0] == V.boi_id and a[-1] == V.eoi_id
        elif q.startswith("where"):
            img = _pixels(s[:k])
            box = [float(v) for v in V.decode_text(a)[1:-1].split(",")]
            assert V.decode_text(a) == _ink_box(list(img), V.image_offset)
            assert 0.0 <= box[0] < box[2] <= 1.0 and 0.0 <= box[1] < box[3] <= 1.0
    assert {"is", "does", "how", "what", "where", "draw", "copy", "write"} <= seen


def test_ink_box_is_tight():
    img = np.zeros((8, 8), int)
    img[2:5, 3:7] = 2
    run = list(np.asarray(V.encode_image(img))[1:-1])
    assert _ink_box(run, V.image_offset) == "[0.38,0.25,0.88,0.62]"
    assert _ink_box([V.image_offset] * 64, V.image_offset) == "[0.00,0.00,0.00,0.00]"
