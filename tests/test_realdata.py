"""The Continual-NExT annotation loader (mage_cl.tasks.realdata) on small files written here."""

import json

import pytest

from mage_cl.tasks.realdata import PROMPT_TEMPLATE, load_task, normalize_answer


class CharTokenizer:
    """A tiny tokenizer: one id per character (ids >= 3), BOS = 1 prepended, EOS = 2."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=True):
        ids = [3 + ord(c) for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i >= 3)


TOK = CharTokenizer()
VQA_Q = "Where is he looking? Answer the question using a single word or phrase."


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def _jsonl(tmp_path, name, records):
    return _write(tmp_path, name, "\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def vqa_files(tmp_path):
    train = _jsonl(tmp_path, "train.jsonl", [
        {"image": "a.jpg", "data": ["What is this photo taken looking through? Answer the question using a "
                                    "single word or phrase.", "net", "What position is this man playing?", "pitcher"]},
        {"image": "b.jpg", "data": ["How many dogs?", "2"]},
    ])
    test = _write(tmp_path, "test.json", json.dumps([
        {"question id": 262148000, "image": "xxx.jpg", "text": VQA_Q, "answer": "down"},
        {"question_id": 7, "image": "y.jpg", "text": "Is it raining?", "answer": "No"},
        {"question id": 8, "image": "z.jpg", "text": "How many cats?", "answer": ["3", "three"]},
    ], indent=1))
    return train, test


def test_vqa_train_turns_and_test_records(vqa_files):
    task = load_task("VQAv2", *vqa_files, tokenizer=TOK)
    assert (task.name, task.paper_name, task.output, set(task.inputs)) == ("vqa", "VQAv2", "text", {"text"})
    assert len(task.train) == 3 and len(task.test) == 3  # two turns + one turn; three records
    first, second = task.train[0], task.train[1]
    q1 = PROMPT_TEMPLATE.format(question="What is this photo taken looking through? Answer the question "
                                         "using a single word or phrase.")
    assert TOK.decode(first.prompt) == q1 and first.prompt[0] == TOK.bos_token_id
    assert first.target == TOK.encode("net", add_special_tokens=False) + [TOK.eos_token_id]
    # the second turn sees the first turn as history
    assert TOK.decode(second.prompt) == q1 + "net\n" + PROMPT_TEMPLATE.format(question="What position is this man playing?")
    assert TOK.decode(second.target[:-1]) == "pitcher"
    assert task.test[0].meta["question_id"] == 262148000 and task.test[1].meta["question_id"] == 7
    assert TOK.decode(task.test[0].prompt) == PROMPT_TEMPLATE.format(question=VQA_Q)
    assert task.max_new_tokens >= max(len(e.target) for e in task.train + task.test)


def test_vqa_judge_and_error_types(vqa_files):
    task = load_task("vqa", *vqa_files, tokenizer=TOK)
    down, rain, cats = task.test
    judge = lambda text, ex: task.judge(TOK.encode(text, add_special_tokens=False), ex)
    assert judge("down", down).correct and judge(" Down.", down).correct
    assert judge("no", rain).correct and judge("NO!", rain).correct  # case / punctuation normalized
    assert judge("three", cats).correct and judge("3", cats).correct  # any accepted answer
    assert judge("up", down).error == "HAL"
    assert judge("yes", rain).error == "HAL"
    assert judge("maybe", rain).error == "IUF"  # not yes/no where yes/no is asked
    assert judge("4", cats).error == "HAL"
    assert judge("many", cats).error == "IUF"  # no number where a number is asked
    assert judge("he is looking at the ground below the net", down).error == "IUF"  # not a short phrase
    assert judge("", down).error == "OTH"
    assert judge("downdowndowndown", down).error == "OTH"
    # the target itself is judged correct
    assert all(task.judge(e.target[:-1], e).correct for e in task.test)


def test_refcoco_bbox_iou(tmp_path):
    q = "Please provide the bounding box coordinate of the region this sentence describes: tennis player."
    train = _jsonl(tmp_path, "ref.jsonl", [{"image": "a.jpg", "data": [q, "[0.27,0.42,0.83,0.73]"]}])
    test = _write(tmp_path, "ref.json", json.dumps([
        {"question id": "34136", "size": [640, 424], "image": "xxx.jpg", "text": q,
         "origin answer bbox": "[242.94,155.68,86.22,162.53]", "answer bbox": "[0.38,0.41,0.51,0.67]"}]))
    task = load_task("RefCOCO", train, test, TOK)
    assert task.name == "grounding" and task.train[0].meta["bbox"] == (0.27, 0.42, 0.83, 0.73)
    ex = task.test[0]
    judge = lambda text: task.judge(TOK.encode(text, add_special_tokens=False), ex)
    assert judge("[0.38,0.41,0.51,0.67]").correct
    assert judge("[0.39, 0.42, 0.52, 0.68]").correct  # IoU ~0.78
    assert judge("[0.45,0.41,0.58,0.67]").error == "HAL"  # IoU ~0.30
    assert judge("the tennis player").error == "IUF"  # no box where a box is asked
    assert TOK.decode(ex.target[:-1]) == "[0.38,0.41,0.51,0.67]"


def test_imagenet_and_ocr_and_max_examples(tmp_path):
    train = _jsonl(tmp_path, "in.jsonl", [{"image": f"{k}.JPEG", "data": ["What is the object in the image?", "Cock."]}
                                          for k in range(5)])
    test = _jsonl(tmp_path, "in_test.jsonl", [  # a JSONL test file is accepted too
        {"question id": f"{k}.JPEG", "image": f"{k}.JPEG", "text": "What is the object in the image?",
         "answer": "Recreational vehicle"} for k in range(4)])
    task = load_task("ImageNet", train, test, TOK, max_examples=2)
    assert (len(task.train), len(task.test)) == (2, 2)
    assert task.judge(TOK.encode("recreational vehicle", add_special_tokens=False), task.test[0]).correct
    assert task.judge(TOK.encode("a truck", add_special_tokens=False), task.test[0]).error == "HAL"
    ocr = load_task("ocr", train, test, TOK)
    assert ocr.paper_name == "OCRVQA" and len(ocr.test) == 4


def test_image_encoder_prepends_image_tokens(tmp_path, vqa_files):
    train, test = vqa_files
    for name in ("a.jpg", "b.jpg", "xxx.jpg", "y.jpg", "z.jpg"):
        (tmp_path / name).write_bytes(b"fake")
    seen = []

    def encoder(path):
        seen.append(path)
        return [900, 901, 902]

    task = load_task("vqa", train, test, TOK, image_encoder=encoder)
    assert set(task.inputs) == {"image", "text"}
    assert all(e.prompt[:3] == [900, 901, 902] for e in task.train + task.test)
    assert str(tmp_path / "a.jpg") in seen
    (tmp_path / "z.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"test.json: record 2: image .*z.jpg"):
        load_task("vqa", train, test, TOK, image_encoder=encoder)


def test_image_output_tasks_are_not_implemented(vqa_files):
    for name in ("Flickr30k", "generation", "HQEdit", "editing"):
        with pytest.raises(NotImplementedError, match="text-output tasks"):
            load_task(name, *vqa_files, tokenizer=TOK)
    with pytest.raises(ValueError, match="valid tasks: vqa"):
        load_task("coco", *vqa_files, tokenizer=TOK)


@pytest.mark.parametrize("lines, match", [
    (['{"image": "a.jpg", "data": ["q", "a"]}', '{"image": "b.jpg", "data": ["q", "a"'], r"train.jsonl:2: invalid JSON"),
    (['{"image": "a.jpg", "data": ["q", "a"]}', "", '{"image": "b.jpg"}'], r"train.jsonl:3: missing key 'data'"),
    (['{"image": "a.jpg", "data": ["q", "a", "q2"]}'], r"train.jsonl:1: 'data' must hold question/answer pairs"),
    (['{"image": "a.jpg", "data": "q"}'], r"train.jsonl:1: 'data' must be list"),
    (['["q", "a"]'], r"train.jsonl:1: expected a JSON object"),
])
def test_malformed_train_lines_name_file_and_line(tmp_path, vqa_files, lines, match):
    train = _write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        load_task("vqa", train, vqa_files[1], TOK)


@pytest.mark.parametrize("text, match", [
    ('[\n{"question id": 1, "text": "q", "answer": "a"},\n{"question id": 2, "text": "q" "answer": "a"}\n]',
     r"test.json:3: invalid JSON"),
    ('[{"question id": 1, "text": "q"}]', r"test.json: record 0: missing key 'answer'"),
    ('[{"question id": 1, "text": "q", "answer": "a"}, {"text": "q", "answer": "a"}]',
     r"record 1: missing key 'question id'"),
    ('[{"question id": 1, "text": "q", "answer": 3}]', r"'answer' must be str or list"),
    ('[]', r"no test examples"),
])
def test_malformed_test_records_are_named(tmp_path, vqa_files, text, match):
    test = _write(tmp_path, "test.json", text)
    with pytest.raises(ValueError, match=match):
        load_task("vqa", vqa_files[0], test, TOK)


def test_bad_bbox_and_missing_file(tmp_path, vqa_files):
    train = _jsonl(tmp_path, "ref.jsonl", [{"image": "a.jpg", "data": ["box?", "the left one"]}])
    with pytest.raises(ValueError, match=r"ref.jsonl:1: answer 0 'the left one' is not a box"):
        load_task("grounding", train, vqa_files[1], TOK)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_task("vqa", vqa_files[0], str(tmp_path / "nope.json"), TOK)


def test_normalize_answer():
    assert normalize_answer("  The Recreational-Vehicle. ") == "recreational vehicle"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("Mom\u2019s Family") == "mom s family"


class HFLikeTokenizer(CharTokenizer):
    """Renders special tokens as text unless asked not to, like a Hugging Face tokenizer."""

    def decode(self, ids, skip_special_tokens=False):
        names = {1: "<s>", 2: "</s>"}
        return "".join(("" if skip_special_tokens else names[i]) if i in names else chr(i - 3) for i in ids)


def test_judge_skips_special_tokens_of_hf_tokenizers(vqa_files):
    tok = HFLikeTokenizer()
    task = load_task("vqa", *vqa_files, tokenizer=tok)
    assert task.judge([tok.bos_token_id] + tok.encode("down", add_special_tokens=False), task.test[0]).correct
