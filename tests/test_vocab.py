"""The joint text + image-token vocabulary (mage_cl.vocab)."""

import pickle

import numpy as np
import pytest

from mage_cl.vocab import PLACEHOLDER, SPECIAL_TOKENS, TEXT_CHARS, Vocab


def test_id_layout_partitions_the_vocabulary():
    v = Vocab(levels=5)
    assert v.size == len(v) == len(SPECIAL_TOKENS) + len(TEXT_CHARS) + 5
    assert (v.pad_id, v.bos_id, v.eos_id, v.sep_id, v.boi_id, v.eoi_id) == (0, 1, 2, 3, 4, 5)
    kinds = [(v.is_special_token(t), v.is_text_token(t), v.is_image_token(t)) for t in range(v.size)]
    assert all(sum(k) == 1 for k in kinds)  # every id is exactly one kind
    assert sum(k[2] for k in kinds) == 5 and sum(k[1] for k in kinds) == len(TEXT_CHARS)
    assert not v.is_image_token(v.size) and not v.is_text_token(-1)
    assert not v.is_image_token(v.boi_id)  # BOI/EOI are special, not pixels


def test_text_round_trip_and_unknown_character():
    v = Vocab()
    text = "what is the digit plus 3? [0.25,0.50,0.75,1.00] it's (a-b)"
    ids = v.encode_text(text)
    assert len(ids) == len(text) and all(v.is_text_token(t) for t in ids)
    assert v.decode_text(ids) == text
    assert v.decode_text(v.encode_text(TEXT_CHARS)) == TEXT_CHARS
    with pytest.raises(ValueError, match=r"'Q' at position 4"):
        v.encode_text("the Q")


def test_decode_text_renders_non_text_tokens_as_placeholder():
    v = Vocab()
    ids = [v.bos_id] + v.encode_text("ab") + v.encode_image(np.array([[1, 2]])) + [v.eos_id]
    assert v.decode_text(ids) == PLACEHOLDER + "ab" + PLACEHOLDER * 4 + PLACEHOLDER


@pytest.mark.parametrize("shape", [(8, 8), (8, 16), (12, 12), (3, 5), (1, 1)])
def test_image_round_trip(shape):
    v = Vocab(levels=5)
    img = np.random.default_rng(sum(shape)).integers(0, 5, size=shape)
    ids = v.encode_image(img)
    assert ids[0] == v.boi_id and ids[-1] == v.eoi_id and len(ids) == img.size + 2
    assert all(v.is_image_token(t) for t in ids[1:-1])
    np.testing.assert_array_equal(v.decode_image(ids, shape), img)
    # float arrays holding integer levels are accepted too
    assert v.encode_image(img.astype(np.float32)) == ids


def test_decode_image_rejects_malformed_sequences():
    v = Vocab()
    img = np.random.default_rng(0).integers(0, 5, size=(8, 8))
    ids = v.encode_image(img)
    assert v.decode_image(ids[:-1], (8, 8)) is None  # no EOI (truncated)
    assert v.decode_image(ids[1:], (8, 8)) is None  # no BOI
    assert v.decode_image(ids[:-2] + [v.eoi_id], (8, 8)) is None  # one pixel short
    assert v.decode_image(ids, (8, 16)) is None  # wrong shape
    assert v.decode_image(ids + [v.eos_id], (8, 8)) is None  # trailing token
    bad = list(ids)
    bad[10] = v.encode_text("a")[0]
    assert v.decode_image(bad, (8, 8)) is None  # text inside the image
    assert v.decode_image([], (8, 8)) is None


def test_encode_image_rejects_bad_input():
    v = Vocab(levels=5)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        v.encode_image(np.array([[0, 5]]))
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        v.encode_image(np.array([[-1, 0]]))
    with pytest.raises(ValueError, match="2-D"):
        v.encode_image(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integers"):
        v.encode_image(np.array([[0.5, 1.0]]))


def test_quantize_digits_intensities():
    v = Vocab(levels=5)
    np.testing.assert_array_equal(v.quantize(np.array([[0, 2, 3, 4, 8, 13, 14, 16]])),
                                  [[0, 0, 1, 1, 2, 3, 4, 4]])
    assert Vocab(levels=17).quantize(np.arange(17.0)[None]).tolist() == [list(range(17))]
    with pytest.raises(ValueError, match="intensities"):
        v.quantize(np.array([[17.0]]))
    with pytest.raises(ValueError, match="intensities"):
        v.quantize(np.array([[-1.0]]))


def test_levels_validation_and_determinism():
    with pytest.raises(ValueError, match="levels"):
        Vocab(levels=1)
    a, b = Vocab(levels=4), Vocab(levels=4)
    assert a == b and hash(a) == hash(b) and a != Vocab(levels=5)
    img = np.array([[0, 3], [2, 1]])
    assert a.encode_image(img) == b.encode_image(img) and a.encode_text("x") == b.encode_text("x")


def test_pickle_round_trip():
    v = Vocab(levels=6)
    w = pickle.loads(pickle.dumps(v))
    assert w == v and w.size == v.size
    img = np.random.default_rng(3).integers(0, 6, size=(4, 4))
    assert w.encode_image(img) == v.encode_image(img)
    assert w.decode_text(v.encode_text("seven")) == "seven"


def test_describe_is_readable():
    v = Vocab()
    ids = [v.bos_id] + v.encode_image(np.zeros((2, 2), int)) + v.encode_text("hi") + [v.sep_id]
    assert v.describe(ids) == "<bos><image 4 px>hi<sep>"
    assert "unterminated" in v.describe(v.encode_image(np.zeros((2, 2), int))[:-1])
