"""Tiny random Janus / Emu3 / Chameleon / CLIP checkpoints and a tiny Continual-NExT data directory.

Everything is built here from local pieces (no download): a character-level tokenizer
(``tokenizers`` WordLevel over printable ASCII + the family's special tokens), the family's
PIL image processor with a 16-32 px image size, a random-init model from a small config,
all ``save_pretrained`` to a directory the driver then loads like a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

_CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
JANUS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image_placeholder>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% else %}Assistant: {{ m['content'][0]['text'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def char_tokenizer(named: Optional[Dict[str, str]] = None, added: Sequence[str] = (), sep: Optional[str] = None,
                   eos_after: bool = False, max_length: Optional[int] = None):
    """A character-level fast tokenizer; ``named`` special tokens become attributes (``tok.image_token``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + _CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    single = "<s> $A </s>" if eos_after else "<s> $A"
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    kw = {"sep_token": sep} if sep else {}
    if max_length:
        kw["model_max_length"] = max_length
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=dict(named or {}), **kw)
    if added:
        tok.add_tokens(list(added), special_tokens=True)
    return tok


def _text_config(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)


def make_janus(path: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """Janus: 32 px images, 16 image tokens (4x4 VQ grid of 32 codes), a 2-layer LLaMA."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    tok = char_tokenizer({"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                          "eoi_token": "<end_of_image>"})
    cfg = JanusConfig(
        text_config=dict(model_type="llama", **_text_config(len(tok))),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                           projection_dim=32, num_image_tokens=16, mlp_ratio=2.0),
        vq_config=dict(embed_dim=4, num_embeddings=32, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, projection_dim=32,
                       image_token_embed_dim=32, num_hidden_layers=1),
        image_token_id=tok.convert_tokens_to_ids("<image_placeholder>"))
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg)
    ip = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = JanusProcessor(image_processor=ip, tokenizer=tok, num_image_tokens=16,
                          chat_template=JANUS_TEMPLATE if chat_template else None)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def make_emu3(path: Path, seed: int = 0) -> Path:
    """Emu3: VQ downsampling 8, 32 codes; input images resized to 16-32 px; a 2-layer text model."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

    named = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
             "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
    tok = char_tokenizer(named, added=["<|extra_200|>"] + [f"<|visual token {k:06d}|>" for k in range(32)])
    cfg = Emu3Config(
        vq_config=dict(codebook_size=32, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                       temporal_downsample_factor=4, hidden_size=32, num_attention_heads=1),
        text_config=_text_config(len(tok)), vocabulary_map=tok.get_vocab())
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(cfg)
    ip = Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32, spatial_factor=8)
    proc = Emu3Processor(image_processor=ip, tokenizer=tok)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def chameleon_image_token(i: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i)) + "Z"


def make_chameleon(path: Path, seed: int = 0) -> Path:
    """Chameleon: 32 px images, 16 image tokens (4x4 grid of 32 codes), a 2-layer decoder."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    tok = char_tokenizer({"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"},
                         added=[chameleon_image_token(i) for i in range(32)], sep="<reserved08706>")
    cfg = ChameleonConfig(**_text_config(len(tok)),
                          vq_config=dict(embed_dim=4, num_embeddings=32, latent_channels=4, resolution=32,
                                         base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1,
                                         attn_resolutions=[]),
                          vocabulary_map=tok.get_vocab())
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg)
    ip = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=16)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


def make_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIPModel (16-d towers, 32 px images) with its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = char_tokenizer(eos_after=True, max_length=32)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=2, bos_token_id=1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def write_png(path: Path, rng: np.random.Generator, size=(24, 20)) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype("uint8")
    Image.fromarray(arr).save(path)
    return path.name


COLORS = ["red", "blue", "green"]


def make_data(root: Path, tasks: Iterable[str], n_train: int = 4, n_test: int = 3, seed: int = 0) -> Path:
    """A Continual-NExT data directory (appendix 9.1 formats) with small PNG images for ``tasks``."""
    rng = np.random.default_rng(seed)
    for task in tasks:
        d = root / task
        d.mkdir(parents=True, exist_ok=True)
        train: List[dict] = []
        test: List[dict] = []
        if task in ("VQAv2", "ImageNet", "OCRVQA"):
            q = {"VQAv2": "What color is it? Answer the question using a single word or phrase.",
                 "ImageNet": "What is the object in the image? Answer the question using a single word or phrase.",
                 "OCRVQA": "Who wrote this book? Answer the question using a single word or phrase."}[task]
            for i in range(n_train):
                train.append({"image": write_png(d / f"tr{i}.png", rng),
                              "data": [q, COLORS[i % 3], "Is it bright?", "yes" if i % 2 else "no"]})
            for i in range(n_test):
                test.append({"question id": i, "image": write_png(d / f"te{i}.png", rng), "text": q,
                             "answer": COLORS[i % 3]})
        elif task == "RefCOCO":
            q = "Please provide the bounding box coordinate of the region this sentence describes: the dog."
            for i in range(n_train):
                train.append({"image": write_png(d / f"tr{i}.png", rng), "data": [q, "[0.10,0.20,0.50,0.60]"]})
            for i in range(n_test):
                test.append({"question id": str(i), "size": [24, 20], "image": write_png(d / f"te{i}.png", rng),
                             "text": q, "origin answer bbox": "[2.4,4.0,9.6,8.0]", "answer bbox": "[0.10,0.20,0.50,0.60]"})
        elif task == "Flickr30k":
            for i in range(n_train):
                train.append({"image": write_png(d / f"tr{i}.png", rng),
                              "data": ["Please generate the image.", f"A {COLORS[i % 3]} square on a wall."]})
            for i in range(n_test):
                test.append({"question id": str(1000 + i),
                             "text": f"Please generate the image: A {COLORS[i % 3]} square on a wall."})
        elif task == "HQEdit":
            for i in range(n_train):
                train.append({"source image": write_png(d / f"src{i}.png", rng),
                              "target image": "target images/" + write_png(d / "target images" / f"t{i}.png", rng),
                              "instruction": f"Paint the wall {COLORS[i % 3]}."})
            for i in range(n_test):
                test.append({"source image": write_png(d / f"tsrc{i}.png", rng),
                             "target image": "target images/" + write_png(d / "target images" / f"tt{i}.png", rng),
                             "instruction": f"Please generate the image: Paint the wall {COLORS[i % 3]}."})
        else:
            raise ValueError(task)
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (d / "test.json").write_text(json.dumps(test, indent=1))
    return root
