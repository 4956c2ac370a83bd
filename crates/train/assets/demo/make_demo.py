"""Writes train.jsonl, the bundled demo dataset for `qlora train` on tests/fixtures/tiny-llama.

Deterministic (fixed seed); run from anywhere: python3 make_demo.py. See README.md.
"""
import json
import os
import random

# Every word is from the tiny model's corpus (tests/fixtures/tiny-llama/corpus.txt), so the byte-level BPE
# trained on it encodes them in few tokens. Their order defines the "After X comes Y" cycle.
WORDS = [
    "rust", "torch", "python", "tensor", "matrix", "vector", "batch", "token", "sequence",
    "length", "layer", "head", "query", "key", "value", "attention", "rotary", "norm", "scale",
    "alpha", "rank", "adapter", "weight", "block",
]

records = []
for n in range(0, 96):  # "Step up from 7:" -> " 8 9 10 11."
    records.append({"prompt": f"Step up from {n}:", "completion": " " + " ".join(str(n + k) for k in range(1, 5)) + "."})
for n in range(4, 100):  # "Step down from 7:" -> " 6 5 4 3."
    records.append({"prompt": f"Step down from {n}:", "completion": " " + " ".join(str(n - k) for k in range(1, 5)) + "."})
for i, w in enumerate(WORDS):  # "From rust to" -> " torch.": a fixed cycle, pure recall
    records.append({"prompt": f"From {w} to", "completion": f" {WORDS[(i + 1) % len(WORDS)]}."})
for w in WORDS:  # "Is it rust?" -> " It is rust.": copying from the prompt needs attention
    records.append({"prompt": f"Is it {w}?", "completion": f" It is {w}."})

random.Random(1234).shuffle(records)
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "train.jsonl"), "w") as f:
    for r in records:
        f.write(json.dumps(r) + "\n")
print(len(records), "records")
