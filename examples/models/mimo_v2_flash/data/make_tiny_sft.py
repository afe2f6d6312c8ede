#!/usr/bin/env python
"""Write ``tiny_sft.jsonl``: the small chat dataset the no-argument ``finetune.sh`` run trains on.

Short, regular tasks (sums, counting, echoing, greetings) that a tiny model can visibly learn in a few dozen
steps on a CPU. Deterministic: running it again reproduces the committed file byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PHRASES = [
    "the quick brown fox",
    "jumps over the lazy dog",
    "hybrid sliding window attention",
    "a mixture of experts",
    "Megatron-Bridge converts checkpoints",
    "hello",
]


def records(count: int = 320, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            user, answer = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == 1:
            start = rng.randint(0, 5)
            stop = start + rng.randint(2, 4)
            user, answer = f"Count from {start} to {stop}.", " ".join(str(n) for n in range(start, stop + 1))
        elif kind == 2:
            phrase = rng.choice(PHRASES)
            user, answer = f"Repeat: {phrase}", phrase
        else:
            user, answer = rng.choice(["hello!", "hi!", "Hello, Assistant."]), "hi, how can I help you today?"
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


if __name__ == "__main__":
    target = Path(__file__).with_name("tiny_sft.jsonl")
    target.write_text("".join(json.dumps(record) + "\n" for record in records()))
    print(f"wrote {target}")
