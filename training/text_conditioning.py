"""Captions -> the text inputs of a denoiser, through the frozen pretrained encoder (`pipelines/text_encoder.py`).

Each unique caption is encoded once and kept (on the CPU), so that training time goes to the denoiser: MNIST's
captions repeat. Caption dropout for classifier-free guidance replaces a caption by the empty prompt, drawn from
the step's generator, so a resumed run drops the same captions.
"""

import torch

from pipelines.text_encoder import DEFAULT_MAX_LENGTH, drop_shared_padding, encode_prompts


class TextConditioning:
    """`conditioning(batch, device, generator)` -> `{"encoder_hidden_states", "encoder_attention_mask"[,
    "pooled_projections"]}` for the batch's captions; no dropout without a generator (validation)."""

    def __init__(
        self, tokenizer, encoder, uses_pooled: bool, caption_dropout: float, max_length: int = DEFAULT_MAX_LENGTH
    ):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.uses_pooled, self.caption_dropout, self.max_length = uses_pooled, caption_dropout, max_length
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def encode(self, captions: list[str], device) -> dict:
        missing = sorted(set(captions) - set(self.cache))
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            states, mask, pooled = encode_prompts(self.tokenizer, self.encoder, chunk, self.max_length)
            for index, text in enumerate(chunk):
                self.cache[text] = (states[index].cpu(), mask[index].cpu(), pooled[index].cpu())
        states, mask, pooled = (torch.stack([self.cache[c][part] for c in captions]).to(device) for part in range(3))
        states, mask = drop_shared_padding(states, mask)
        inputs = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if self.uses_pooled:
            inputs["pooled_projections"] = pooled
        return inputs

    def __call__(self, batch: dict, device, generator: torch.Generator | None = None) -> dict:
        captions = list(batch["caption"])
        if generator is not None and self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=generator, device=generator.device) < self.caption_dropout
            captions = ["" if dropped else text for text, dropped in zip(captions, drop.tolist())]
        return self.encode(captions, device)
