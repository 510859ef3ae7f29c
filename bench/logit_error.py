"""How far bf16 logits are from the float32 model's: glm4 and transformers (SDPA and eager attention)
on the same saved random weights, the decode benchmark's shape.

glm4 and transformers round differently in bf16 (glm4's CPU kernels sum in another order), so their
logits differ from each other; this shows whether either is farther from float32 than the other.
Each row: max |difference| relative to the largest |logit|, mean |difference| relative to the mean
|logit|, and how often the top token agrees.

    python bench/logit_error.py              # prompts of 64 and 512 tokens
    python bench/logit_error.py 64 2000
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from glm4 import Glm4Config, Glm4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SMALL  # noqa: E402  (the decode benchmark's shape)


def difference(logits: torch.Tensor, reference: torch.Tensor) -> str:
    worst = ((logits - reference).abs().max() / reference.abs().max()).item()
    mean = ((logits - reference).abs().mean() / reference.abs().mean()).item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return f"max {worst:6.2%}   mean {mean:6.2%}   top-1 agrees {top1:6.1%}"


def main() -> None:
    import transformers

    lengths = [int(n) for n in sys.argv[1:]] or [64, 512]
    torch.manual_seed(0)
    config = Glm4Config(**SMALL, vocab_size=151552, max_position_embeddings=32768, rms_norm_eps=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        Glm4ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp)
        float32 = Glm4ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        models = {"glm4 bf16": Glm4ForCausalLM.from_pretrained(tmp)}
        for attention in ("sdpa", "eager"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.bfloat16, attn_implementation=attention
            )
            models[f"transformers bf16 {attention}"] = hf.eval()
        for length in lengths:
            ids = torch.randint(0, config.vocab_size, (1, length))
            with torch.inference_mode():
                reference = float32(ids).logits.float()
                logits = {name: model(ids).logits.float() for name, model in models.items()}
            print(f"{length} positions, against the float32 model:")
            for name, values in logits.items():
                print(f"  {name:24} {difference(values, reference)}")
            eager, sdpa = logits["transformers bf16 eager"], logits["transformers bf16 sdpa"]
            print(f"  {'transformers eager, sdpa':24} {difference(eager, sdpa)}  (to each other)")
            ours = logits["glm4 bf16"]
            print(f"  {'glm4, transformers sdpa':24} {difference(ours, sdpa)}  (to each other)")


if __name__ == "__main__":
    main()
