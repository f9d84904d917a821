"""How often a shapes model draws given prompts right, seed by seed, judged as `daguerre eval` judges.

    python bench/prompt_seeds.py [MODEL] [--n 40] [--seed 0] [PROMPT ...]

For each prompt (default: the four of the shapes card, "a red circle above a blue square" ...), seeds
seed..seed+n-1 at the model's recommended settings, each image judged by the shipped shapes classifier
(`metrics.evaluate.judge`): "right" = every object of the prompt present with the right shape and colour, no
other object, and the relation true; "reversed" = the objects right and the relation turned around.
"""

from __future__ import annotations

import argparse

import daguerre
from daguerre.data.shapes import parse_caption
from daguerre.metrics.evaluate import EvalItem, judge, to_batch
from daguerre.metrics.extractors import load_classifier_extractor

PROMPTS = ("a red circle above a blue square", "a blue square below a red circle",
           "a green star to the left of a yellow triangle",
           "a large red circle above a small blue square on a black background")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default="shapes")
    p.add_argument("prompts", nargs="*", default=list(PROMPTS))
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pipe = daguerre.load(args.model)
    classifier = load_classifier_extractor("default", "shapes")
    for prompt in args.prompts:
        spec = parse_caption(prompt)
        images = [g.image for g in pipe(prompt, seed=args.seed, n=args.n, batch_size=min(args.n, 20))]
        items = [EvalItem("relation", prompt, args.seed + i, spec=spec) for i in range(args.n)]
        verdicts, _ = judge(classifier, to_batch(images), items)
        right = sum(v["relation"] for v in verdicts)
        reversed_ = sum(v.get("reversed", False) for v in verdicts)
        print(f"{prompt!r}: right for {right} of {args.n} seeds, reversed {reversed_}")


if __name__ == "__main__":
    main()
