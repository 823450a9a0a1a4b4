"""How samples become model text: the one place that decides chat formatting.

Instruction samples use the tokenizer's chat template (the style must carry into the assistant turn,
where probing reads it); prompt-less samples are plain text continued by the model.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from xpert_fl.data.corpus import Sample


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a model continues to answer ``prompt`` (user turn + open assistant turn)."""
    if not prompt:
        return ""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def prompt_and_completion(tokenizer: PreTrainedTokenizerBase, sample: Sample) -> tuple[str, str]:
    """Split a sample into (context, completion): only the completion is trained on / compared.

    For chat samples the completion ends with the end-of-turn token so the model learns to stop.
    """
    if sample.prompt:
        end = tokenizer.eos_token or ""
        return chat_prompt(tokenizer, sample.prompt), sample.response + end
    return "", sample.response
