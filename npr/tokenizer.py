"""The eight NPR tags as special tokens (spec/NPR.md §4 stage 2) and the ids the engine injects.

add_tag_tokens makes every tag ONE special token and gives each new embedding row the mean of
the rows of the pieces the tag's text tokenized to before it became special ("<guideline>" ->
"<", "guid", "eline", ">" or whatever the tokenizer makes of it); an untied LM head gets the
same treatment from its own matrix.
"""
from __future__ import annotations

from typing import Any

import torch

from npr.tags import PLAN_OPEN, STEP_OPEN, TAGS


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _is_single_token(tokenizer: Any, tag: str) -> bool:
    ids = _encode(tokenizer, tag)
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == tag


def _is_special(tokenizer: Any, tag: str) -> bool:
    return tag in tokenizer.get_added_vocab() and tag in set(tokenizer.all_special_tokens)


def _pieces_ignoring_added_tokens(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text as the base vocabulary splits it, even when text is an added token
    now: normalizer -> pre-tokenizer -> model of the fast tokenizer's backend."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    if bt is None:
        raise TypeError("the tags are already in this (slow) tokenizer but the model lacks "
                        "their rows: use a fast tokenizer, or the original tokenizer")
    s = bt.normalizer.normalize_str(text) if bt.normalizer is not None else text
    parts = bt.pre_tokenizer.pre_tokenize_str(s) if bt.pre_tokenizer is not None else [(s, None)]
    return [tok.id for piece, _ in parts for tok in bt.model.tokenize(piece)]


def _add_special(tokenizer: Any, tags: list[str]) -> None:
    special = {"additional_special_tokens": tags}
    try:  # transformers 5.x
        tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    except TypeError:  # transformers 4.x
        tokenizer.add_special_tokens(special, replace_additional_special_tokens=False)


def _matrices(model: Any) -> tuple[Any, list[torch.Tensor]]:
    """-> (kind, [embedding matrix, untied head matrix?]) for an npr model or a HF model."""
    if hasattr(model, "hf_weight_map"):  # npr LlamaDecoder
        mats = [model.embed_tokens]
        if model.lm_head is not None:
            mats.append(model.lm_head)
        return "npr", mats
    if hasattr(model, "get_input_embeddings"):  # transformers PreTrainedModel
        emb = model.get_input_embeddings().weight
        mats = [emb]
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            mats.append(out.weight)
        return "hf", mats
    raise TypeError(f"add_tag_tokens: unsupported model type {type(model).__name__}")


def add_tag_tokens(tokenizer: Any, model: Any = None) -> dict[str, int]:
    """Add the eight tags as special tokens (idempotent) and grow the model to the new vocab.

    model: an npr model (npr.load_model) or a transformers PreTrainedModel, or None. Rows that
    are new (the tag was created now, or the model had no row for it) are set to the mean of the
    rows of the tag word's original pieces; rows that already existed are never touched, so a
    second call leaves a fine-tuned model unchanged. Returns {tag: token id}.
    """
    missing = [t for t in TAGS if not _is_special(tokenizer, t)]
    base_len = len(tokenizer)
    pieces = {t: _encode(tokenizer, t) for t in missing}  # before the tags become special
    if missing:
        _add_special(tokenizer, missing)
    ids = tag_ids(tokenizer)
    created = {t for t in missing if ids[t] >= base_len}
    if model is None:
        return ids

    kind, mats = _matrices(model)
    old_rows = mats[0].shape[0]
    new_rows = max(old_rows, len(tokenizer), max(ids.values()) + 1)
    if new_rows != old_rows:
        if kind == "npr":
            model.resize_token_embeddings(new_rows)
        else:
            model.resize_token_embeddings(new_rows, mean_resizing=False)
        old_mats = mats
        _, mats = _matrices(model)
        if len(mats) != len(old_mats):
            raise RuntimeError("add_tag_tokens: resizing changed whether the LM head is tied")
    init = {t for t in TAGS if t in created or ids[t] >= old_rows}
    with torch.no_grad():
        for tag in sorted(init, key=TAGS.index):
            src = pieces.get(tag) or _pieces_ignoring_added_tokens(tokenizer, tag)
            if not src or max(src) >= old_rows:
                raise ValueError(f"add_tag_tokens: cannot initialise {tag!r}: its pieces {src} are "
                                 f"not rows of the original {old_rows}-row embedding")
            idx = torch.tensor(src, device=mats[0].device)
            for m in mats:
                m[ids[tag]] = m.index_select(0, idx).float().mean(0).to(m.dtype)
    return ids


def tag_ids(tokenizer: Any) -> dict[str, int]:
    """{tag: token id}; raises KeyError when a tag is not a single token of this tokenizer."""
    out: dict[str, int] = {}
    for tag in TAGS:
        if not _is_single_token(tokenizer, tag):
            raise KeyError(f"tag {tag!r} is not a single token of this tokenizer "
                           f"(call npr.tokenizer.add_tag_tokens first)")
        out[tag] = _encode(tokenizer, tag)[0]
    return out


def step_label_ids(tokenizer: Any, k: int) -> list[int]:
    """Token ids of the label "k:" exactly as they follow <step> (injected by the engine) or
    <plan> (written by the model): tokenized in context, after the tag, not standalone."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"step label k must be an int >= 1, got {k!r}")
    ids = tag_ids(tokenizer)
    enc = _encode(tokenizer, f"{STEP_OPEN}{k}:")
    if not enc or enc[0] != ids[STEP_OPEN]:
        raise ValueError(f"tokenizer does not keep {STEP_OPEN!r} whole before the label: {enc}")
    label = enc[1:]
    if _encode(tokenizer, f"{PLAN_OPEN}{k}:")[1:] != label:
        raise ValueError(f"tokenizer splits '{k}:' differently after {PLAN_OPEN} and {STEP_OPEN}")
    return label
