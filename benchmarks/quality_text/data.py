"""Eight text-classification tasks generated offline from a seed: templated sentences over word lists.

Each task is a function ``(rng) -> (sentence, label)``; the split generator draws labels uniformly (balanced in
expectation) and never repeats a sentence across train, validation and test. The tasks are chosen so that the label
depends on word order, negation, composition or counting, not on one cue word, so that a linear probe on the frozen,
mean-pooled pretrained features does not solve them and fine-tuning matters; they share vocabulary (animals, objects,
numbers, verbs), so their fine-tunes pull the same weights different ways.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ANIMALS = ["dog", "cat", "horse", "mouse", "elephant", "rabbit", "tiger", "goat", "sheep", "fox", "wolf", "bear", "lion", "duck",
           "frog", "monkey", "donkey", "camel", "deer", "owl"]
OBJECTS = ["ball", "chair", "table", "box", "lamp", "book", "bottle", "rock", "stick", "bucket", "rope", "cart", "basket",
           "drum", "kettle", "ladder", "blanket", "barrel", "wheel", "brick"]
PEOPLE = ["the farmer", "my uncle", "a child", "the teacher", "our neighbour", "the old man", "a girl", "the doctor"]
POSITIVE = ["good", "great", "wonderful", "pleasant", "excellent", "lovely", "enjoyable", "brilliant", "delightful", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "poor", "dull", "horrible", "disappointing", "weak"]
REVIEWED = ["the film", "the meal", "the concert", "the hotel", "the book", "the game", "the trip", "the show", "the lecture", "the party"]
UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
TOPICS = {
    "sport": ["the football match", "the tennis final", "the marathon", "the swimming race", "the cricket game", "the boxing bout"],
    "food": ["the pasta", "the soup", "the bread", "the curry", "the salad", "the cake"],
    "music": ["the concert", "the song", "the piano recital", "the opera", "the guitar solo", "the album"],
    "weather": ["the storm", "the rain", "the heatwave", "the fog", "the snowfall", "the wind"],
}
VERBS_PAST = ["pushed", "kicked", "dragged", "carried", "chased", "lifted", "pulled", "followed", "watched", "found"]
TENSE_VERBS = [("walks", "walked", "will walk"), ("eats", "ate", "will eat"), ("sings", "sang", "will sing"), ("runs", "ran", "will run"),
               ("writes", "wrote", "will write"), ("reads", "read", "will read"), ("swims", "swam", "will swim"), ("builds", "built", "will build"),
               ("sleeps", "slept", "will sleep"), ("cooks", "cooked", "will cook")]
WHEN = ["in the morning", "at night", "near the river", "with a friend", "in the garden", "after lunch", "every so often", "quietly"]
FILLER = ["", "", "honestly,", "well,", "i think", "apparently", "they say", "in fact"]


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def number_words(n: int) -> str:
    """1 ≤ n ≤ 99 in English words ("forty seven")."""
    if n < 10:
        return UNITS[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + UNITS[n % 10])


def negated_sentiment(rng: np.random.Generator) -> tuple[str, int]:
    """Polarity after zero, one or two negations: "the film was not bad at all" -> positive (1)."""
    positive = bool(rng.integers(2))
    negations = int(rng.choice([0, 1, 1, 2]))
    literal = positive if negations % 2 == 0 else not positive
    adjective = _pick(rng, POSITIVE if literal else NEGATIVE)
    if negations == 0:
        middle = f"was {adjective}"
    elif negations == 1:
        middle = _pick(rng, [f"was not {adjective}", f"was never {adjective}", f"was hardly {adjective}"])
    else:
        middle = _pick(rng, [f"was not at all not {adjective}", f"was never not {adjective}", f"was not without being {adjective}"])
    return f"{_pick(rng, FILLER)} {_pick(rng, REVIEWED)} {middle}".strip(), int(positive)


def agent_is_animal(rng: np.random.Generator) -> tuple[str, int]:
    """Who acts: "the rock was pushed by the goat" -> the animal is the agent (1); active or passive voice."""
    animal, thing = _pick(rng, ANIMALS), _pick(rng, OBJECTS)
    label = int(rng.integers(2))
    agent, patient = ("the " + animal, "the " + thing) if label else ("the " + thing, "the " + animal)
    verb = _pick(rng, VERBS_PAST)
    sentence = f"{agent} {verb} {patient}" if rng.integers(2) else f"{patient} was {verb} by {agent}"
    return f"{sentence} {_pick(rng, WHEN)}", label


def number_parity(rng: np.random.Generator) -> tuple[str, int]:
    """Parity of a number written in words among other words: "she bought forty seven eggs" -> odd (1)."""
    n = int(rng.integers(1, 100))
    noun = _pick(rng, ["eggs", "books", "coins", "stones", "apples", "tickets", "boxes", "chairs"])
    who = _pick(rng, ["she", "he", "the shop", "my aunt", "the school", "we"])
    verb = _pick(rng, ["bought", "sold", "counted", "lost", "found", "ordered"])
    return f"{who} {verb} {number_words(n)} {noun} {_pick(rng, WHEN)}", n % 2


def animal_first(rng: np.random.Generator) -> tuple[str, int]:
    """Which comes first, by word order alone: "the bucket next to the goat" -> the object first (0); the same two words either way."""
    animal, thing = _pick(rng, ANIMALS), _pick(rng, OBJECTS)
    label = int(rng.integers(2))
    first, second = ("the " + animal, "the " + thing) if label else ("the " + thing, "the " + animal)
    link = _pick(rng, ["next to", "behind", "and", "near", "beside", "with", "under", "opposite"])
    return f"{_pick(rng, FILLER)} {_pick(rng, ['i saw', 'look at', 'there is', 'she drew'])} {first} {link} {second}".strip(), label


def is_question(rng: np.random.Generator) -> tuple[str, int]:
    """Question or statement by word order alone, no punctuation: "can the goat swim" -> 1, "the goat can swim" -> 0."""
    aux = _pick(rng, ["can", "will", "did", "does", "should", "could", "would", "must"])
    subject = _pick(rng, ["the " + a for a in ANIMALS] + PEOPLE)
    verb = _pick(rng, ["swim", "sleep", "run", "sing", "eat", "read", "wait", "jump"])
    label = int(rng.integers(2))
    if label:
        sentence = f"{aux} {subject} {verb} {_pick(rng, WHEN)}"
    else:
        sentence = f"{subject} {aux} {verb} {_pick(rng, WHEN)}"
    return sentence, label


def first_topic(rng: np.random.Generator) -> tuple[str, int]:
    """Topic of the first-mentioned event when two are mentioned: "after the storm we enjoyed the cake" -> weather."""
    names = list(TOPICS)
    a, b = rng.choice(len(names), 2, replace=False)
    first, second = _pick(rng, TOPICS[names[a]]), _pick(rng, TOPICS[names[b]])
    pattern = _pick(rng, ["after {0} we talked about {1}", "{0} came before {1}", "first {0} and then {1}", "{0} was followed by {1}"])
    return f"{_pick(rng, FILLER)} {pattern.format(first, second)} {_pick(rng, WHEN)}".strip(), int(a)


def list_count(rng: np.random.Generator) -> tuple[str, int]:
    """How many things are listed, one to four: "a box, a lamp and a goat" -> 3 (label 2)."""
    k = int(rng.integers(1, 5))
    items = ["a " + x for x in rng.choice(OBJECTS + ANIMALS, k, replace=False)]
    listed = items[0] if k == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{_pick(rng, FILLER)} {_pick(rng, ['i saw', 'we carried', 'there was', 'she painted'])} {listed} {_pick(rng, WHEN)}".strip(), k - 1


def tense(rng: np.random.Generator) -> tuple[str, int]:
    """Present, past or future (0, 1, 2) of the main verb, with a time phrase that is often misleading."""
    label = int(rng.integers(3))
    verb = _pick(rng, TENSE_VERBS)[label]
    when = _pick(rng, ["yesterday", "tomorrow", "today", "last week", "next year", "these days", ""])
    return f"{_pick(rng, PEOPLE)} {verb} {_pick(rng, WHEN)} {when}".strip(), label


@dataclass(frozen=True)
class TextTask:
    name: str
    make: Callable[[np.random.Generator], tuple[str, int]]
    num_classes: int
    description: str


TASKS: tuple[TextTask, ...] = (
    TextTask("negation", negated_sentiment, 2, "review polarity after 0-2 negations (\"the film was not bad\")"),
    TextTask("agent", agent_is_animal, 2, "is the animal the one acting (active or passive voice)"),
    TextTask("parity", number_parity, 2, "odd or even number written in words (1-99)"),
    TextTask("order", animal_first, 2, "is the animal named before the object (same words either way)"),
    TextTask("question", is_question, 2, "question or statement, word order only (no punctuation)"),
    TextTask("topic", first_topic, 4, "topic (sport, food, music, weather) of the first of two events"),
    TextTask("count", list_count, 4, "how many things a list names (1-4)"),
    TextTask("tense", tense, 3, "present, past or future of the verb, with distracting time words"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


def get_task(name: str) -> TextTask:
    return next(t for t in TASKS if t.name == name)


def seed_for(seed: int, *parts: str) -> int:
    """A stable 32-bit seed derived from the suite seed and names (no Python hash randomisation)."""
    return int.from_bytes(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()[:4], "little")


def task_splits(task: TextTask, sizes: dict[str, int], seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """Disjoint train/val/test splits of ``task``: sentences drawn in one stream, duplicates skipped, labels balanced by round-robin."""
    rng = np.random.default_rng(seed_for(seed, task.name))
    total = sum(sizes.values())
    per_label: dict[int, list[str]] = {c: [] for c in range(task.num_classes)}
    seen: set[str] = set()
    quota = sum(-(-n // task.num_classes) for n in sizes.values())
    tries = 0
    while min(len(v) for v in per_label.values()) < quota:
        tries += 1
        if tries > 200 * total:
            raise RuntimeError(f"{task.name}: cannot draw {total} distinct sentences")
        sentence, label = task.make(rng)
        if sentence in seen or len(per_label[label]) >= quota:
            continue
        seen.add(sentence)
        per_label[label].append(sentence)
    # stratified: each split takes its share of every label, then is shuffled
    out, start = {}, 0
    for split, n in sizes.items():
        share = [n // task.num_classes + (1 if c < n % task.num_classes else 0) for c in range(task.num_classes)]
        chunk = [(s, c) for c in range(task.num_classes) for s in per_label[c][start:start + share[c]]]
        chunk = [chunk[i] for i in rng.permutation(len(chunk))]
        out[split] = ([s for s, _ in chunk], np.array([c for _, c in chunk], dtype=np.int64))
        start += max(share)
    return out
