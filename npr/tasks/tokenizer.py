"""The demo's tokenizer: a `tokenizers` WordLevel model over single characters plus the words the
format is made of, saved and loaded as a transformers PreTrainedTokenizerFast.

Every printable ASCII character and "\\n" is a token; so are the tag words "guideline", "plan",
"step", "takeaway", "boxed" and the piece "</". A tag written as text is therefore a few pieces
("<guideline>" -> "<" "guideline" ">", "</step>" -> "</" "step" ">"), like a real subword
vocabulary splits it, and npr.tokenizer.add_tag_tokens later makes each tag ONE special token
whose embedding starts as the mean of those pieces. Digits are always single tokens (arithmetic
stays learnable digit by digit).
"""
from __future__ import annotations

import os
from typing import Any

WORDS = ("guideline", "takeaway", "plan", "step", "boxed", "</")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
# Longest alternatives first; anything else is one character.
_SPLIT = "|".join(w for w in WORDS) + r"|[\s\S]"


def build_tokenizer() -> Any:
    """-> PreTrainedTokenizerFast (pad <pad>, bos <s>, eos </s>, unk <unk>); no NPR tags yet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for t in SPECIALS + tuple(CHARS) + WORDS:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    return fast


def save_tokenizer(tokenizer: Any, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tokenizer.save_pretrained(folder)
