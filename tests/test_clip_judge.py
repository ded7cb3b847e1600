"""The CLIP judge of Flickr30k / HQEdit (mage_cl.tasks.clip_judge): a tiny random CLIPModel and a fixed-score stub."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from backbone_fakes import make_clip
from mage_cl.tasks.base import Example
from mage_cl.tasks.clip_judge import (AUTO_PAIRS, ClipError, ClipJudge, ClipScorer, resolve_threshold,
                                      strip_instruction)

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(20 + 3 * k, 28, 3), dtype=np.uint8)) for k in range(n)]


def test_score_is_100_times_the_clamped_cosine_of_clips_own_embeddings(clip_dir):
    scorer = ClipScorer.load(str(clip_dir), device=torch.device("cpu"))
    images = _images(6, seed=1)
    texts = ["a red square", "two dogs on a beach at dusk", "x", "a blue wall", "green", "an empty room"]
    got = scorer.score(images, texts)
    # reference: CLIPModel.forward's own normalized embeddings, in float64
    px = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    tx = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"], pixel_values=px)
    cos = (out.image_embeds.double() * out.text_embeds.double()).sum(-1)
    want = (100 * cos.clamp_min(0)).tolist()
    assert got == pytest.approx(want, abs=1e-4)
    assert any(c < 0 for c in cos.tolist()) or any(c > 0 for c in cos.tolist())
    assert all(0.0 <= s <= 100.0 for s in got)
    # texts longer than CLIP's positions are truncated, not an error
    assert len(scorer.score(images[:1], ["a very long caption " * 20])) == 1


class StubScorer:
    """Returns fixed scores in order, records what it was asked."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.seen = []

    def score(self, images, texts):
        self.seen += list(zip(images, texts))
        out, self.scores = self.scores[: len(images)], self.scores[len(images):]
        return out


def test_judge_maps_scores_to_verdicts_and_types_errors():
    START = 7
    decoded = {}

    def decode(ids):
        return None if len(ids) < 3 else decoded.setdefault(tuple(ids), f"image{len(decoded)}")

    stub = StubScorer([29.99, 30.0, 75.5])
    judge = ClipJudge(stub, 30.0, decode, START)
    ex = Example(prompt=[1], target=[-2], meta={"clip_text": "a dog"})
    v1, v2, v3 = (judge([START, 1, 2], ex), judge([START, 3, 4], ex), judge([START, 5, 6], ex))
    assert (v1.correct, v1.error, v1.score) == (False, "HAL", 29.99)  # a well-formed image below tau
    assert (v2.correct, v2.error, v2.score) == (True, None, 30.0)    # tau itself counts
    assert v3.correct and v3.score == 75.5
    assert [t for _, t in stub.seen] == ["a dog"] * 3
    assert judge([], ex).error == "OTH"                   # empty answer
    assert judge([42, 43, 44], ex).error == "IUF"         # text (no image start) where an image is asked
    assert judge([START, 1], ex).error == "OTH"           # an image that does not decode
    assert len(stub.seen) == 3                            # only decoded images are scored


def test_threshold_auto_is_the_10th_percentile_of_the_reference_pairs():
    pairs = [(("image", k), f"text {k}") for k in range(20)]  # stand-ins: the stub never looks at them
    scores = [float(s) for s in np.random.default_rng(0).permutation(np.arange(1, 21))]
    tau, how = resolve_threshold("auto", StubScorer(scores), pairs, batch=7)
    assert tau == 2.0 and "10th percentile of 20" in how  # nearest rank: ceil(0.1 * 20) = 2nd smallest
    tau, _ = resolve_threshold(None, StubScorer([50.0, 10.0, 30.0]), pairs[:3])
    assert tau == 10.0  # ceil(0.3) = 1: the smallest of three
    many = [(("image", k), "t") for k in range(AUTO_PAIRS + 40)]
    stub = StubScorer(list(range(AUTO_PAIRS + 40)))
    resolve_threshold("auto", stub, many)
    assert len(stub.seen) == AUTO_PAIRS
    assert resolve_threshold("25", StubScorer([]), []) == (25.0, "fixed")
    assert resolve_threshold(0, StubScorer([]), []) == (0.0, "fixed")
    for bad, words in (("high", "'auto' or a number"), ("101", "[0, 100]"), ("-1", "[0, 100]")):
        with pytest.raises(ClipError, match=words.replace("[", r"\[").replace("]", r"\]")):
            resolve_threshold(bad, StubScorer([]), [])
    with pytest.raises(ClipError, match="needs training pairs"):
        resolve_threshold("auto", StubScorer([]), [])


def test_threshold_auto_on_the_tiny_clip_and_real_files(clip_dir, tmp_path):
    scorer = ClipScorer.load(str(clip_dir), device=torch.device("cpu"))
    paths = []
    for k, im in enumerate(_images(5, seed=3)):
        p = tmp_path / f"{k}.png"
        im.save(p)
        paths.append(str(p))
    texts = [f"a photo number {k}" for k in range(5)]
    tau, _ = resolve_threshold("auto", scorer, list(zip(paths, texts)), batch=2)
    direct = sorted(scorer.score(_images(5, seed=3), texts))
    assert tau == pytest.approx(direct[0], abs=1e-4)  # ceil(0.5) = 1: the smallest of five


def test_clip_checkpoint_errors(tmp_path, clip_dir):
    with pytest.raises(ClipError, match="no such directory"):
        ClipScorer.load(str(tmp_path / "nope"))
    with pytest.raises(ClipError, match="no config.json"):
        ClipScorer.load(str(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ClipError, match="model_type 'llama': not a CLIPModel"):
        ClipScorer.load(str(other))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((clip_dir / "config.json").read_text())
    with pytest.raises(ClipError, match="not a loadable CLIPModel"):
        ClipScorer.load(str(broken))


def test_strip_instruction():
    assert strip_instruction("Please generate the image: A woman kneading bread.") == "A woman kneading bread."
    assert strip_instruction("please generate the image. a dog") == "a dog"
    assert strip_instruction("Replace the desk.") == "Replace the desk."
