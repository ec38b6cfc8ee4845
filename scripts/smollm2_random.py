"""SmolLM2-135M-shaped HF checkpoints with random weights, for timing where the real GGUF file
cannot travel (a lent GPU machine has no package index).

  python scripts/smollm2_random.py export DIR     # here: SmolLM2's config + tokenizer -> DIR
  python scripts/smollm2_random.py random DIR OUT # there: DIR + random fp32 weights -> OUT
Timings on such a model are real; its text is noise (the weights are random).
"""
from __future__ import annotations

import os
import sys


def export(out: str) -> None:
    from transformers import AutoConfig

    from npr.bench.speedup import smollm2_gguf
    from npr.models.loader import load_tokenizer

    path = smollm2_gguf()
    cfg = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cfg.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)


def randomize(src: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "export":
        export(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "random":
        randomize(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
