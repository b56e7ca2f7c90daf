"""The project's own embedded dataset: short arithmetic word problems with exact answers.

Generated deterministically from a seed by the templates below (nothing is copied from a
public dataset). SmolLM2-135M-Instruct, the embedded teacher/student, solves few multi-step
problems, so most problems are one step with small numbers; ``step_weights`` sets the mix.
Every question's gold is computed by the same code that writes its text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = [
    "Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack",
    "Kara", "Leo", "Mia", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tina",
    "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zack",
]
ITEMS = [
    "apples", "books", "pencils", "marbles", "stickers", "cookies", "coins", "cards",
    "balloons", "shells", "stamps", "toy cars", "oranges", "eggs", "flowers", "crayons",
]
CONTAINERS = ["boxes", "bags", "baskets", "jars", "packs"]

GAIN = ["buys {n} more {item}", "finds {n} more {item}", "gets {n} more {item} from a friend"]
LOSE = ["gives away {n} {item}", "loses {n} {item}", "uses {n} {item}"]


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    steps: int


def _one_problem(rng: random.Random, steps: int) -> Problem:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.random()
    if steps == 1 and kind < 0.25:
        # a single multiplication: a containers with b items each
        a, b = rng.randint(2, 5), rng.randint(2, 6)
        c = rng.choice(CONTAINERS)
        q = f"{name} has {a} {c} with {b} {item} in each. How many {item} does {name} have?"
        return Problem(q, a * b, 1)
    total = rng.randint(3, 12)
    parts = [f"{name} has {total} {item}."]
    for i in range(steps):
        if rng.random() < 0.5 or total <= 1:
            n = rng.randint(1, 9)
            total += n
            action = rng.choice(GAIN).format(n=n, item=item)
        else:
            n = rng.randint(1, min(9, total - 1))
            total -= n
            action = rng.choice(LOSE).format(n=n, item=item)
        parts.append(f"{'Then' if i == 0 else 'After that,'} {name} {action}.")
    parts.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(parts), total, steps)


def generate_problems(
    count: int,
    seed: int,
    step_weights: tuple[float, float, float] = (0.7, 0.2, 0.1),
    exclude: set[str] | None = None,
) -> list[Problem]:
    """``count`` distinct problems; questions in ``exclude`` (e.g. another split) are never produced."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > count * 200:
            raise RuntimeError(f"could not generate {count} distinct problems (got {len(out)})")
        steps = rng.choices([1, 2, 3], weights=step_weights)[0]
        p = _one_problem(rng, steps)
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def embedded_splits(
    train_size: int = 1200,
    eval_size: int = 300,
    seed: int = 1234,
    step_weights: tuple[float, float, float] = (0.7, 0.2, 0.1),
) -> dict[str, list[Problem]]:
    """Disjoint train and eval splits: the eval questions never appear in train."""
    eval_split = generate_problems(eval_size, seed + 1, step_weights)
    train = generate_problems(train_size, seed, step_weights, exclude={p.question for p in eval_split})
    return {"train": train, "eval": eval_split}
