"""Text encoding: prompts from templates, batched, template-averaged, L2-normalised. Pure."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from negalign_cli.compute.types import OpenClipModule
from negalign_cli.defaults import PLACEHOLDER


def format_prompts(words: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Word-major prompt list: all templates of ``words[0]``, then of ``words[1]``, ..."""
    return [template.replace(PLACEHOLDER, word) for word in words for template in templates]


def count_truncated(tokenizer: Callable[..., Any], texts: Sequence[str], context_length: int) -> int:
    """How many texts are longer than the text tower's context (they get cut at the end).

    Uses the tokenizer's ``encode`` (open_clip's BPE tokenizer) and counts start/end tokens; a
    tokenizer without ``encode`` reports 0.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return 0
    return sum(len(encode(text)) + 2 > context_length for text in texts)


def encode_tokens(model: OpenClipModule, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)``, but without the padding columns when that is exact.

    For open_clip's standard ``CLIP`` (causal mask, pooling at the end-of-text token, zero padding)
    the columns after the longest prompt's last token cannot influence any pooled feature, so
    they are cut before the transformer: prompts of ~10 tokens in a 77-token context encode
    several times faster with identical results. Any other text tower takes the plain path.
    """
    import open_clip

    exact = (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "attn_mask", None) is not None
        and tokens.dim() == 2
    )
    plain: Callable[[torch.Tensor], torch.Tensor] = model.encode_text
    if not exact:
        return plain(tokens)
    length = int((tokens != 0).sum(dim=1).max())
    if length >= tokens.shape[1] or bool((tokens[:, length:] != 0).any()):
        return plain(tokens)
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    pooled: torch.Tensor = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return pooled
    if isinstance(projection, torch.nn.Linear):
        projected: torch.Tensor = projection(pooled)
        return projected
    result: torch.Tensor = pooled @ projection
    return result


@torch.inference_mode()
def encode_texts(
    model: OpenClipModule,
    tokenizer: Callable[[list[str]], torch.Tensor],
    words: Sequence[str],
    templates: Sequence[str],
    *,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
    normalize_prompts: bool = False,
) -> torch.Tensor:
    """Embed each word as the L2-normalised mean of its prompt embeddings.

    By default the raw prompt embeddings are averaged, as NegLabel, CSP and NegRefine do for ID
    classes and negative labels alike (``features.view(-1, T, D).mean(1)``, then normalise);
    ``normalize_prompts=True`` normalises each prompt embedding first, as CLIP's own zero-shot
    classifier does. ``batch_size`` counts prompts; a batch always holds whole words.
    Returns a float32 CPU tensor of shape ``(len(words), embed_dim)``; ``on_batch(n)`` is called
    with the number of words finished after each batch.
    """
    if not templates:
        raise ValueError("at least one template is needed")
    if not words:
        raise ValueError("no words to encode")
    if device is None:
        device = next(model.parameters()).device
    n_templates = len(templates)
    words_per_batch = max(1, batch_size // n_templates)
    chunks = []
    for start in range(0, len(words), words_per_batch):
        chunk = words[start : start + words_per_batch]
        tokens = tokenizer(format_prompts(chunk, templates)).to(device)
        features = encode_tokens(model, tokens).float()
        if normalize_prompts:
            features = F.normalize(features, dim=-1)
        features = features.view(len(chunk), n_templates, -1).mean(dim=1)
        chunks.append(F.normalize(features, dim=-1).cpu())
        if on_batch is not None:
            on_batch(len(chunk))
    return torch.cat(chunks)
