"""``builtin:tasks``: a small multi-task instruction set fedbits generates itself.

It exists so that a run works with no files and no network, and so that a tiny model
shows a real learning signal within a few dozen steps: every family has short prompts,
a one-token-or-so exact answer, and a distinct task name, which gives partitioners
(dirichlet, natural) and unseen-task evaluation a meaningful grouping.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fedbits.data.types import Example

_WORDS = (
    "apple bread chair cloud dance eagle flame grape horse island jelly kite lemon "
    "money night ocean piano queen river stone table umbrella violin water yellow zebra "
    "ball cat dog egg fish gold hat ice jam key lamp milk nest owl pen rain sun tree "
    "van wind box cup door fork goat hill ink leaf moon nose pig road ship toy wolf"
).split()

_Make = Callable[[random.Random], tuple[str, str]]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"Add {a} and {b}.", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return f"Subtract {b} from {a}.", str(a - b)


def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 20), rng.randint(2, 12)
    return f"Multiply {a} by {b}.", str(a * b)


def _numbers(rng: random.Random) -> list[int]:
    return rng.sample(range(100), rng.randint(3, 6))


def _spaced(items: list[int] | list[str]) -> str:
    return " ".join(map(str, items))


def _largest(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"Largest number: {_spaced(nums)}", str(max(nums))


def _smallest(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"Smallest number: {_spaced(nums)}", str(min(nums))


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"Sort ascending: {_spaced(nums)}", _spaced(sorted(nums))


def _count_numbers(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng)
    return f"How many numbers: {_spaced(nums)}", str(len(nums))


def _phrase(rng: random.Random) -> list[str]:
    return rng.sample(_WORDS, rng.randint(2, 4))


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return f"Reverse the word order: {_spaced(words)}", _spaced(words[::-1])


def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return f"Uppercase: {_spaced(words)}", _spaced(words).upper()


def _first_word(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return f"First word: {_spaced(words)}", words[0]


def _last_word(rng: random.Random) -> tuple[str, str]:
    words = _phrase(rng)
    return f"Last word: {_spaced(words)}", words[-1]


def _count_letter(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    return f"Count the letter {letter} in {word}.", str(word.count(letter))


FAMILIES: dict[str, _Make] = {
    "add": _add,
    "subtract": _subtract,
    "multiply": _multiply,
    "largest": _largest,
    "smallest": _smallest,
    "sort": _sort,
    "count_numbers": _count_numbers,
    "reverse_words": _reverse_words,
    "uppercase": _uppercase,
    "first_word": _first_word,
    "last_word": _last_word,
    "count_letter": _count_letter,
}


def generate_builtin_tasks(per_task: int, seed: int) -> list[Example]:
    """``per_task`` examples of every family, grouped by family; same seed, same list."""
    return [ex for name, make in FAMILIES.items() for ex in _family(name, make, per_task, seed)]


def _family(name: str, make: _Make, per_task: int, seed: int) -> list[Example]:
    """Distinct prompts where the family has enough of them, so a held-out fraction is not
    a copy of training prompts; the try budget bounds the loop for small families."""
    # A string seed is hashed deterministically by random.Random (not by hash()), and a
    # per-family stream keeps each family unchanged when another one is added.
    rng = random.Random(f"{seed}:{name}")
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < per_task:
        prompt, completion = make(rng)
        tries += 1
        if prompt in seen and tries < 20 * per_task:
            continue
        seen.add(prompt)
        out.append(Example(prompt=prompt, completion=completion, task=name, answer=completion))
    return out
