"""A small, learnable preference set made from templates (jbt's own; Apache-2.0 like the code).

Chosen answers are courteous and on topic, rejected ones dismissive or off topic, with varied
wording so a model must learn the distinction rather than one token. Deterministic per seed.

    python -m jbt.data.synthetic OUT.jsonl [--n 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from jbt.atomic import atomic_file

TOPICS = ["book", "movie", "recipe", "song", "board game", "hiking trail", "podcast", "museum", "tea", "bicycle",
          "camera", "houseplant", "poem", "city to visit", "programming language", "breakfast", "exercise", "painting"]
ASKS = ["Can you recommend a {t}?", "What {t} would you suggest for me?", "I am looking for a good {t}. Any ideas?",
        "Which {t} do you like best?", "Please suggest a {t} for the weekend."]
GOOD_OPEN = ["Sure!", "Of course.", "Happy to help.", "Great question.", "Certainly."]
GOOD_BODY = ["A {a} {t} that many people enjoy is worth a try, and I can suggest more if you like.",
             "You might enjoy a {a} {t}; tell me what you liked before and I will narrow it down.",
             "I would pick a {a} {t}. It is popular, easy to find, and a nice way to spend time."]
GOOD_ADJ = ["classic", "well-loved", "friendly", "relaxing", "thoughtful", "delightful", "charming"]
BAD_OPEN = ["No.", "Whatever.", "Figure it out yourself.", "Not my problem.", "Ugh."]
BAD_BODY = ["Every {t} is {a} anyway, so it does not matter.", "Why would I care about your {t}? It is {a}.",
            "Stop asking about a {t}. They are all {a}.", "I do not talk about {a} things like a {t}."]
BAD_ADJ = ["boring", "useless", "pointless", "awful", "dull", "terrible"]


def make_pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
  """n TRL-style records {"prompt", "chosen", "rejected"} as plain strings."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    t = rng.choice(TOPICS)
    prompt = rng.choice(ASKS).format(t=t)
    chosen = f"{rng.choice(GOOD_OPEN)} {rng.choice(GOOD_BODY).format(t=t, a=rng.choice(GOOD_ADJ))}"
    rejected = f"{rng.choice(BAD_OPEN)} {rng.choice(BAD_BODY).format(t=t, a=rng.choice(BAD_ADJ))}"
    out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
  return out


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
  with atomic_file(path) as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("out")
  ap.add_argument("--n", type=int, default=400)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  write_jsonl(Path(a.out), make_pairs(a.n, a.seed))
  print(f"wrote {a.n} pairs to {a.out}")


if __name__ == "__main__":
  main()
