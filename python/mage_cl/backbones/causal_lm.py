"""A text-only causal LM (anything ``AutoModelForCausalLM`` loads): text prompts, text answers.

This is the ``--model PATH`` path for a checkpoint that is not one of the Dual-to-Dual
families: it runs the text-output tasks with the images left out of the prompts (the tasks
then declare ``inputs={"text"}``, so MAGE trains the text-input and text-output adapters
only); the run's record says ``"reads_images": false``. Image-output tasks are refused
before training (:data:`IMAGE_OUTPUT_REFUSAL`). Prompts use the plain template
``{history}{question}\\n``; the adapters go on every q/k/v/o/gate/up/down linear.
"""

from __future__ import annotations

from typing import Any, Dict

from .base import BackboneError
from .hf import HFBackbone, first_line

__all__ = ["CausalLMBackbone", "IMAGE_OUTPUT_REFUSAL"]

IMAGE_OUTPUT_REFUSAL = (
    "a text-only causal LM cannot answer with an image; run the text-output tasks only "
    "(--tasks vqa,classification,ocr,grounding) or use a Janus or Emu3 checkpoint"
)


class CausalLMBackbone(HFBackbone):
    """A text-only transformers causal LM; see the module docstring."""

    name = "causal-lm"
    display_name = "causal LM"
    lm_prefix = None
    reads_images = False
    writes_images = False
    image_output_refusal = IMAGE_OUTPUT_REFUSAL

    @property
    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def _load_processor(self) -> None:
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise BackboneError(f"--model {self.path}: no usable tokenizer: {first_line(exc)}") from None
        self.processor = None

    def render_prompt(self, history, question, n_images: int) -> str:
        return "".join(f"{q}\n{a}\n" for q, a in history) + f"{question}\n"

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "reads_images": False}
