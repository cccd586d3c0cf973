"""The offline benchmark suite: real handwritten digits (scikit-learn's ``load_digits``), generated
scenes of coloured shapes, and text-only items, with questions written by the toolkit.

Every item is built from a seeded random stream, so the same ``seed`` gives the same files.
The three splits never share an image: digit images come from disjoint slices of one seeded
permutation of the 1797 digits, and scenes are drawn from random streams keyed by the split.

Harness item formats (one JSON object per line, ``image`` relative to the JSONL's folder)::

    {"id": "digit-0007", "image": "images/digit-0007.png", "question": "Which digit is shown?",
     "options": ["0", ..., "9"], "answer": "7"}                        # multiple choice
    {"id": ..., "image": ... or null, "question": ..., "answers": ["8", "eight"]}   # open answer
    {"id": ..., "text": "A natural-language passage ..."}               # text fidelity (KL, top-1)

Example::

    from atv.suite import write_suite
    write_suite("suite", seed=0, quick=True)   # suite/<benchmark>.jsonl, suite/images/, suite/calib.json
"""

from __future__ import annotations

import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evaluation.benchmarks import CHOICE, FIDELITY, OPEN
from pruning.errors import ConfigError
from pruning.options import check_seed
from pruning.outputs import atomic_folder, check_output_folder

log = logging.getLogger(__name__)

IMAGE_SIZE = 48  # pixels per side of every suite image (the default model's input size)
SPLITS = ("train", "calib", "eval")
# Slices of the seeded permutation of the 1797 digits: train | calib | eval (disjoint).
DIGIT_SLICES = {"train": (0, 1200), "calib": (1200, 1400), "eval": (1400, 1797)}

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = ("1", "2", "3", "4")
DIGITS = tuple(str(d) for d in range(10))
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass
class Item:
    """One benchmark item. ``image`` is a PIL image (or None); the other fields follow the harness format."""

    id: str
    question: str = ""
    image: Any = None
    options: list[str] | None = None  # multiple choice: the candidates, ``answer`` is one of them
    answer: str | None = None
    answers: list[str] | None = None  # open answer: accepted strings (normalised exact match)
    text: str | None = None  # text fidelity: a passage, no question

    def record(self, image_path: str | None) -> dict[str, Any]:
        """The JSON object of the harness format."""
        if self.text is not None:
            return {"id": self.id, "text": self.text}
        out: dict[str, Any] = {"id": self.id, "image": image_path, "question": self.question}
        if self.options is not None:
            out.update(options=self.options, answer=self.answer)
        else:
            out["answers"] = self.answers
        return out

    @property
    def target(self) -> str:
        """The reference answer text (what the assistant should say)."""
        return self.answer if self.options is not None else (self.answers or [""])[0]


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: str  # CHOICE | OPEN | FIDELITY, as evaluation.benchmarks names them
    skill: str  # what it measures, for reports
    make: Callable[[random.Random, Any], Item]  # (rng, digit sample or None) -> item without id
    uses_digits: bool = False
    image: bool = True  # False for text-only benchmarks (no train/calib split)


# ---------------------------------------------------------------- images


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)  # (1797, 8, 8) in [0, 16], (1797,)


def digit_indices(split: str, seed: int) -> list[int]:
    """Indices into ``load_digits`` that belong to ``split`` (disjoint across splits for one seed)."""
    _check_split(split)
    order = list(range(len(_digits()[1])))
    random.Random(seed).shuffle(order)
    start, stop = DIGIT_SLICES[split]
    return order[start:stop]


def digit_image(index: int):
    """The 8x8 digit ``index`` as a dark-on-light RGB image of IMAGE_SIZE pixels (bilinear upscale)."""
    from PIL import Image

    pixels = _digits()[0][index]
    grey = (255 - pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def scene_image(shapes: list[tuple[str, str, tuple[int, int, int, int]]]):
    """A light-grey canvas with (shape, colour name, box) shapes drawn in order."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (235, 235, 235))
    draw = ImageDraw.Draw(canvas)
    for shape, colour, box in shapes:
        _draw_shape(draw, shape, box, COLOURS[colour])
    return canvas


def _box_at(rng: random.Random, cx: int, cy: int, lo: int = 14, hi: int = 20) -> tuple[int, int, int, int]:
    size = rng.randint(lo, hi)
    x0 = min(max(cx - size // 2, 0), IMAGE_SIZE - size)
    y0 = min(max(cy - size // 2, 0), IMAGE_SIZE - size)
    return x0, y0, x0 + size - 1, y0 + size - 1


def _one_shape(rng: random.Random, position: str | None = None):
    """One random shape: (shape, colour, box); centred near the middle unless ``position`` is given."""
    shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
    jitter = lambda: rng.randint(-4, 4)  # noqa: E731 - a tiny local helper
    centre = {"left": (10, 24 + jitter()), "right": (37, 24 + jitter()), "top": (24 + jitter(), 10),
              "bottom": (24 + jitter(), 37), None: (24 + jitter(), 24 + jitter())}[position]
    return shape, colour, _box_at(rng, *centre, lo=14 if position else 16, hi=18 if position else 24)


def _grid_shapes(rng: random.Random, count: int):
    """``count`` small shapes in distinct cells of a 2x2 grid (never overlapping)."""
    cells = rng.sample([(12, 12), (35, 12), (12, 35), (35, 35)], count)
    return [(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), _box_at(rng, cx + rng.randint(-2, 2),
             cy + rng.randint(-2, 2), lo=12, hi=16)) for cx, cy in cells]


# ---------------------------------------------------------------- item makers


def _mc(question: str, image, options: list[str], answer: str) -> Item:
    return Item(id="", question=question, image=image, options=list(options), answer=answer)


def _make_digit(rng: random.Random, index: int) -> Item:
    return _mc("Which digit is shown?", digit_image(index), list(DIGITS), str(int(_digits()[1][index])))


def _make_digit_plus(rng: random.Random, index: int) -> Item:
    value = int(_digits()[1][index]) + 1
    return Item(id="", question="What is the digit shown plus one? Answer with a number.", image=digit_image(index),
                answers=[str(value), NUMBER_WORDS[value]])


def _make_digit_compare(rng: random.Random, index: int) -> Item:
    value, pivot = int(_digits()[1][index]), rng.choice((3, 4, 5, 6))
    if value == pivot:
        pivot += rng.choice((-1, 1))
    return _mc(f"Is the digit shown larger than {pivot}? Answer yes or no.", digit_image(index), ["yes", "no"],
               "yes" if value > pivot else "no")


def _make_colour(rng: random.Random, _: Any) -> Item:
    shape = _one_shape(rng)
    return _mc("What colour is the shape?", scene_image([shape]), sorted(COLOURS), shape[1])


def _make_shape(rng: random.Random, _: Any) -> Item:
    shape = _one_shape(rng)
    return _mc("What shape is shown?", scene_image([shape]), list(SHAPES), shape[0])


def _make_position(rng: random.Random, _: Any) -> Item:
    position = rng.choice(POSITIONS)
    return _mc("Where is the shape in the image?", scene_image([_one_shape(rng, position)]), list(POSITIONS), position)


def _make_count(rng: random.Random, _: Any) -> Item:
    count = rng.randint(1, 4)
    return _mc("How many shapes are there?", scene_image(_grid_shapes(rng, count)), list(COUNTS), str(count))


# Easy general-knowledge and grammar items for the LM alone: (question, options, answer).
# Written by hand, kept as written (no filtering by the model's answers); options are shuffled per seed.
TEXT_MC: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("What is the capital of France?", ("Paris", "London", "Berlin", "Rome"), "Paris"),
    ("What is the capital of Italy?", ("Rome", "Madrid", "Paris", "Oslo"), "Rome"),
    ("What is the capital of Japan?", ("Tokyo", "Beijing", "Seoul", "Delhi"), "Tokyo"),
    ("What is the capital of Germany?", ("Berlin", "Vienna", "Paris", "Athens"), "Berlin"),
    ("What is the capital of Spain?", ("Madrid", "Lisbon", "Rome", "Paris"), "Madrid"),
    ("What is the capital of England?", ("London", "Dublin", "Paris", "Berlin"), "London"),
    ("What colour is the sky on a clear day?", ("blue", "red", "green", "black"), "blue"),
    ("What colour is grass?", ("green", "blue", "red", "white"), "green"),
    ("What colour is snow?", ("white", "black", "green", "red"), "white"),
    ("What colour is a banana?", ("yellow", "blue", "black", "purple"), "yellow"),
    ("Which animal barks?", ("dog", "cat", "fish", "cow"), "dog"),
    ("Which animal says meow?", ("cat", "dog", "cow", "horse"), "cat"),
    ("Which animal lives in water and has fins?", ("fish", "dog", "bird", "horse"), "fish"),
    ("Which animal can fly?", ("bird", "dog", "fish", "cow"), "bird"),
    ("Which animal gives us milk?", ("cow", "cat", "fish", "bird"), "cow"),
    ("How many legs does a dog have?", ("4", "2", "6", "8"), "4"),
    ("How many legs does a spider have?", ("8", "2", "4", "6"), "8"),
    ("How many days are in a week?", ("7", "5", "10", "3"), "7"),
    ("How many months are in a year?", ("12", "7", "10", "24"), "12"),
    ("What is 2 plus 2?", ("4", "3", "5", "6"), "4"),
    ("What is 3 plus 5?", ("8", "6", "7", "9"), "8"),
    ("What is 10 minus 3?", ("7", "5", "6", "8"), "7"),
    ("What do bees make?", ("honey", "milk", "bread", "wool"), "honey"),
    ("What do we use to see?", ("eyes", "ears", "feet", "hands"), "eyes"),
    ("What do we use to hear?", ("ears", "eyes", "feet", "nose"), "ears"),
    ("Which season is the coldest?", ("winter", "summer", "spring", "autumn"), "winter"),
    ("Which season is the hottest?", ("summer", "winter", "autumn", "spring"), "summer"),
    ("What is frozen water called?", ("ice", "steam", "sand", "salt"), "ice"),
    ("What gives light during the day?", ("sun", "moon", "lamp", "star"), "sun"),
    ("Which planet do we live on?", ("Earth", "Mars", "Venus", "Jupiter"), "Earth"),
    ("What is the opposite of hot?", ("cold", "warm", "big", "fast"), "cold"),
    ("What is the opposite of big?", ("small", "tall", "long", "wide"), "small"),
    ("What is the opposite of up?", ("down", "left", "over", "in"), "down"),
    ("What is the opposite of day?", ("night", "noon", "week", "sun"), "night"),
    ("What is the plural of cat?", ("cats", "cat", "cates", "catz"), "cats"),
    ("What is the plural of dog?", ("dogs", "doges", "dog", "dogz"), "dogs"),
    ("Which word is a colour?", ("red", "run", "table", "happy"), "red"),
    ("Which word is a fruit?", ("apple", "chair", "river", "shoe"), "apple"),
    ("Which word is an animal?", ("horse", "spoon", "cloud", "pencil"), "horse"),
    ("Which language is spoken in France?", ("French", "German", "Spanish", "Italian"), "French"),
    ("Which language is spoken in Spain?", ("Spanish", "French", "German", "Russian"), "Spanish"),
    ("What do fish live in?", ("water", "trees", "sand", "fire"), "water"),
    ("What do you use to write on paper?", ("pen", "spoon", "cup", "shoe"), "pen"),
    ("Where do birds build nests?", ("trees", "rivers", "cars", "shoes"), "trees"),
)

# Natural-language passages for the KL / top-1 fidelity metric (written for this toolkit).
FIDELITY_TEXTS: tuple[str, ...] = (
    "The morning was cool and quiet, and the baker opened the shop before the first bus arrived.",
    "Rivers carry water from the mountains to the sea, shaping valleys over thousands of years.",
    "To make a cup of tea, boil fresh water, pour it over the leaves and wait a few minutes.",
    "The library on the corner stays open late on Thursdays, when students come to study.",
    "A healthy breakfast often includes fruit, whole grains and something to drink.",
    "The train to the coast leaves at nine, so we should pack our bags tonight.",
    "Cats sleep for much of the day and become more active in the evening.",
    "When the sun sets, the sky turns orange and pink before it fades to dark blue.",
    "Good writing is clear and simple, and every sentence should help the reader.",
    "The old bridge was repaired last year and now carries cars and bicycles again.",
    "Plants need light, water and air to grow, and most of them also need soil.",
    "She practised the piano every evening until the difficult piece felt easy.",
    "The museum shows paintings from many countries, and entry is free on Sundays.",
    "Our neighbours planted tomatoes, beans and herbs in a small garden behind the house.",
    "A map helps travellers find their way, especially in a city they do not know.",
    "Heavy rain is expected tomorrow, so the football match may be moved to Sunday.",
    "The teacher asked the class to read the first chapter and write a short summary.",
    "Bread is made from flour, water, salt and yeast, and it needs time to rise.",
    "The children built a sandcastle near the water and watched the waves wash it away.",
    "Computers store information as numbers, and programs tell them what to do with it.",
    "In autumn the leaves change colour and fall, covering the paths in the park.",
    "He forgot his umbrella at the station and had to walk home in the rain.",
    "The small village is known for its cheese, which is sold at the weekly market.",
    "Exercise is good for the heart, and even a short walk each day can help.",
    "The letter arrived a week late because the address was written incorrectly.",
    "Owls hunt at night, using their sharp hearing to find mice in the grass.",
    "The recipe calls for two eggs, a cup of sugar and a little butter.",
    "After dinner the family sat outside and talked until the stars came out.",
    "The new road will make the trip between the two towns much shorter.",
    "Reading a book before bed helps many people relax and fall asleep.",
    "The farmer woke early to feed the animals and check the fences.",
    "Snow covered the hills overnight, and the roads were closed until noon.",
    "The shop sells fresh fish every morning, caught by boats from the harbour.",
    "A good friend listens carefully and tells you the truth when it matters.",
    "The concert started late, but the music was worth the wait.",
    "Honey bees visit flowers to collect nectar, which they turn into honey.",
    "The bus was crowded, so she stood near the door and read the news on her phone.",
    "Scientists study the weather to predict storms and warn people in time.",
    "The kitchen smelled of fresh bread and coffee when we came downstairs.",
    "Learning a new language takes patience, practice and a little courage.",
)


def _make_text_mc(rng: random.Random, index: int) -> Item:
    question, options, answer = TEXT_MC[index]
    shuffled = list(options)
    rng.shuffle(shuffled)
    return Item(id="", question=question, options=shuffled, answer=answer)


def _make_fidelity(rng: random.Random, index: int) -> Item:
    return Item(id="", text=FIDELITY_TEXTS[index])


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("digit", CHOICE, "perception: which handwritten digit", _make_digit, uses_digits=True),
    Benchmark("scene-colour", CHOICE, "perception: colour of a shape", _make_colour),
    Benchmark("scene-shape", CHOICE, "perception: kind of shape", _make_shape),
    Benchmark("scene-position", CHOICE, "perception: where the shape is", _make_position),
    Benchmark("scene-count", CHOICE, "perception: how many shapes", _make_count),
    Benchmark("digit-compare", CHOICE, "reasoning: compare the digit with a number in the text", _make_digit_compare,
              uses_digits=True),
    Benchmark("digit-plus", OPEN, "reasoning: arithmetic on the digit (generation)", _make_digit_plus,
              uses_digits=True),
    Benchmark("text-mc", CHOICE, "text only: facts and grammar", _make_text_mc, image=False),
    Benchmark("text-fidelity", FIDELITY, "text only: passages for KL / top-1 agreement", _make_fidelity,
              image=False),
)}
IMAGE_BENCHMARKS = tuple(name for name, b in BENCHMARKS.items() if b.image)


# ---------------------------------------------------------------- item streams


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def item_seed(seed: int, split: str, name: str, index: int) -> str:
    """The key of the random stream of one item: scenes of different splits never share a stream."""
    return f"{seed}/{split}/{name}/{index}"


def _stream_rng(seed: int, split: str, name: str, index: int) -> random.Random:
    return random.Random(zlib.crc32(item_seed(seed, split, name, index).encode()))


def make_items(name: str, split: str, n: int, seed: int = 0) -> list[Item]:
    """``n`` items of benchmark ``name`` from ``split`` (deterministic in ``seed``).

    Digit benchmarks cycle through the split's digit images (the train split repeats them with new
    questions when ``n`` exceeds its 1200 images); text-only benchmarks exist only in ``eval`` and
    hold at most as many items as were written.
    """
    bench = get_benchmark(name)
    _check_split(split)
    if n < 1:
        raise ConfigError(f"number of items must be >= 1, got {n} for benchmark {name!r}")
    if not bench.image:
        if split != "eval":
            raise ConfigError(f"text-only benchmark {name!r} has only an 'eval' split, got {split!r}")
        pool = TEXT_MC if bench.kind == CHOICE else FIDELITY_TEXTS
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        sources: list[Any] = order[:n]
    elif bench.uses_digits:
        indices = digit_indices(split, seed)
        if split != "train" and n > len(indices):
            raise ConfigError(f"the {split!r} split has {len(indices)} digit images, asked for {n} items of {name!r}")
        sources = [indices[i % len(indices)] for i in range(n)]
    else:
        sources = [None] * n
    items = []
    for i, source in enumerate(sources):
        item = bench.make(_stream_rng(seed, split, name, i), source)
        item.id = f"{name}-{split}-{i:04d}" if split != "eval" else f"{name}-{i:04d}"
        items.append(item)
    return items


def chance_level(items: list[Item] | list[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform random choice: mean of 1/len(options) (0 for open answers).

    Raises ConfigError for fidelity items (they have no accuracy) and for an empty list.
    """
    if not items:
        raise ConfigError("chance_level needs at least one item, got an empty list")
    total = 0.0
    for item in items:
        record = item.record(None) if isinstance(item, Item) else item
        if "text" in record and "question" not in record:
            raise ConfigError(f"item {record.get('id')!r} is a text-fidelity item; it has no chance level")
        options = record.get("options")
        total += 1.0 / len(options) if options else 0.0
    return total / len(items)


# ---------------------------------------------------------------- writing


@dataclass
class SuiteConfig:
    """What ``write_suite`` writes."""

    seed: int = 0  # one seed for every random choice (digit split permutation, scenes, option order)
    n_eval: int = 40  # eval items per benchmark (text-only ones are capped by the items written)
    n_calib: int = 128  # calibration records in calib.json (round-robin over the image benchmarks)
    benchmarks: tuple[str, ...] = field(default_factory=lambda: tuple(BENCHMARKS))

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.n_eval < 1:
            raise ConfigError(f"n_eval must be >= 1, got {self.n_eval}")
        if self.n_calib < 1:
            raise ConfigError(f"n_calib must be >= 1, got {self.n_calib}")
        for name in self.benchmarks:
            get_benchmark(name)


QUICK_N_EVAL = 12  # eval items per benchmark with quick=True


def _eval_count(name: str, n_eval: int) -> int:
    bench = BENCHMARKS[name]
    if bench.image:
        return n_eval
    return min(n_eval, len(TEXT_MC) if bench.kind == CHOICE else len(FIDELITY_TEXTS))


def write_items(folder: Path, name: str, items: list[Item]) -> dict[str, Any]:
    """Write ``items`` of benchmark ``name`` as the harness file ``folder/<name>.jsonl`` (images into the existing
    ``folder/images``); returns the benchmark's summary (kind, skill, item count, chance level)."""
    lines = []
    for item in items:
        rel = None
        if item.image is not None:
            rel = f"images/{item.id}.png"
            item.image.save(folder / rel)
        lines.append(json.dumps(item.record(rel)))
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    bench = BENCHMARKS[name]
    chance = None if bench.kind == FIDELITY else round(chance_level(items), 4)
    return {"kind": bench.kind, "skill": bench.skill, "items": len(items), "chance": chance}


def calibration_records(n_calib: int, seed: int, folder: Path | None = None) -> list[dict[str, Any]]:
    """``n_calib`` LLaVA-conversation records from the calib split, round-robin over image benchmarks.
    With ``folder`` the images are saved under ``folder/images``."""
    per = -(-n_calib // len(IMAGE_BENCHMARKS))
    streams = {name: make_items(name, "calib", per, seed) for name in IMAGE_BENCHMARKS}
    records = []
    for i in range(n_calib):
        item = streams[IMAGE_BENCHMARKS[i % len(IMAGE_BENCHMARKS)]][i // len(IMAGE_BENCHMARKS)]
        rel = f"images/{item.id}.png"
        if folder is not None:
            item.image.save(folder / rel)
        records.append({"id": item.id, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{item.question}"},
            {"from": "gpt", "value": item.target}]})
    return records


def write_suite(out_dir: str | Path, seed: int = 0, n_eval: int | None = None, n_calib: int = 128,
                quick: bool = False, overwrite: bool = False) -> Path:
    """Write the suite to ``out_dir``: ``<benchmark>.jsonl`` per benchmark, ``images/``, ``calib.json``
    (LLaVA conversations, images relative to ``out_dir``) and ``suite.json`` (counts, chance levels).

    ``n_eval`` defaults to 40 items per benchmark (12 with ``quick=True``). The folder is written to
    a temporary sibling and renamed when complete. Returns the folder.
    """
    n_eval = n_eval if n_eval is not None else (QUICK_N_EVAL if quick else 40)
    config = SuiteConfig(seed=seed, n_eval=n_eval, n_calib=n_calib)
    out = check_output_folder(out_dir, overwrite)  # replaces only a folder this toolkit wrote
    with atomic_folder(out, "suite") as tmp:
        (tmp / "images").mkdir()
        summary = {"seed": seed, "n_eval": config.n_eval, "n_calib": n_calib, "benchmarks": {}}
        for name in config.benchmarks:
            items = make_items(name, "eval", _eval_count(name, config.n_eval), seed)
            summary["benchmarks"][name] = write_items(tmp, name, items)
        records = calibration_records(n_calib, seed, tmp)
        (tmp / "calib.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
        (tmp / "suite.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("wrote the benchmark suite (%d benchmarks, seed %d) to %s", len(config.benchmarks), seed, out)
    return out


def write_prompt_suite(out_dir: str | Path, seed: int = 0, per_benchmark: int = 8, overwrite: bool = False) -> Path:
    """Write question items of every image benchmark from the *train* split (``per_benchmark`` each) to
    ``out_dir``, as harness files with their images and a ``suite.json``: prompts held out from the eval and
    calib splits (no shared image), e.g. for the sensitivity map (``atv probe --map --bench``)."""
    check_seed(seed)
    if per_benchmark < 1:
        raise ConfigError(f"per_benchmark must be >= 1, got {per_benchmark}")
    out = check_output_folder(out_dir, overwrite)
    with atomic_folder(out, "suite") as tmp:
        (tmp / "images").mkdir()
        summary = {"seed": seed, "split": "train", "per_benchmark": per_benchmark, "benchmarks": {}}
        for name in IMAGE_BENCHMARKS:
            summary["benchmarks"][name] = write_items(tmp, name, make_items(name, "train", per_benchmark, seed))
        (tmp / "suite.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return out
