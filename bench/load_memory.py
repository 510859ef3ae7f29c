"""Peak memory while loading a checkpoint, against the size of its weights.

Saves a random GLM-4-shaped model (the bench shape: hidden 1024, 12 layers, vocab 151552, bf16) in
shards, then loads it in a fresh process and reports the peak resident memory the load added.

    python bench/load_memory.py [--shard-size 200MB]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from glm4 import Glm4Config, Glm4ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SMALL  # noqa: E402  (the decode benchmark's shape)

SHAPE = dict(SMALL, vocab_size=151552, rms_norm_eps=1e-5, max_position_embeddings=32768)

# VmHWM (peak resident set of this process image), not ru_maxrss, which a child inherits from its parent.
CHILD = """
import re, sys, torch
from glm4 import Glm4ForCausalLM
def peak():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
model = Glm4ForCausalLM.from_pretrained(sys.argv[1])
loaded = peak()
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # touches every weight page
print(before, loaded, peak())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-size", default="200MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Glm4ForCausalLM(Glm4Config(**SHAPE)).to(torch.bfloat16)
        model.save_pretrained(tmp, max_shard_size=args.shard_size)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        del model
        shards = len(list(Path(tmp).glob("*.safetensors")))
        out = subprocess.run([sys.executable, "-c", CHILD, tmp], capture_output=True, text=True, check=True)
        before, loaded, used = map(int, out.stdout.split())
    print(f"weights: {weights / 2**20:,.0f} MiB in {shards} shards")
    for what, peak in (("from_pretrained", loaded), ("from_pretrained + one forward", used)):
        added = peak - before
        print(f"peak RSS added by {what}: {added / 2**20:,.0f} MiB ({added / weights:.2f}x the weights)")


if __name__ == "__main__":
    main()
