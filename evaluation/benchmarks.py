"""Benchmarks read from local JSON Lines files, one item per line, validated before any model work.

Three kinds of item, told apart by their fields::

    {"id": "digit-0007", "image": "images/digit-0007.png", "question": "Which digit is shown?",
     "options": ["0", "1", ..., "9"], "answer": "7"}                       # choice: 'options' + 'answer'
    {"id": "q-12", "image": null, "question": "How many cats?", "answers": ["2", "two"]}   # open
    {"id": "wiki-3", "text": "A natural-language passage ..."}                          # fidelity

One kind per file (a benchmark reports one score); a file that mixes kinds is refused with the line
of the first item of another kind. ``image`` is relative to the file's folder and must stay inside it
(unless ``allow_outside``: then absolute paths and '..' are accepted), or null/absent for text-only
choice and open items; every image is decoded in full while the file is validated; fidelity items are text-only. Extra
fields (e.g. "category") are ignored. The benchmark's name is the file's stem.

Every problem is a :class:`BenchmarkError` that names the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from pruning.data import inside
from pruning.errors import ToolkitError
from pruning.jsonlines import JsonLineError, json_lines, read_text

CHOICE, OPEN, FIDELITY = "choice", "open", "fidelity"
KINDS = (CHOICE, OPEN, FIDELITY)


class BenchmarkError(ToolkitError, ValueError):
    """A benchmark file or item is malformed, or does not fit what the evaluation asked for."""


def _non_blank(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question, scored by the log-likelihood of each option.

    Args:
        id: the item's id, unique in its benchmark.
        question: the question text.
        options: the answer options, distinct non-blank strings.
        answer: the correct option (one of ``options``).
        image: the image file, or None for a text-only question.

    Raises:
        ValueError: a malformed item, named by its id.
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: str  # one of ``options``
    image: Path | None = None  # None: text-only

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"item {self.id!r}: a multiple-choice item needs a non-empty 'options' list")
        if not all(_non_blank(o) for o in self.options):
            raise ValueError(f"item {self.id!r}: every option must be a non-blank string, got {list(self.options)!r}")
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"item {self.id!r}: options must be distinct, got {list(self.options)!r}")
        if self.answer not in self.options:
            raise ValueError(f"item {self.id!r}: answer {self.answer!r} is not one of the options "
                             f"{list(self.options)!r}")
        if not _non_blank(self.question):
            raise ValueError(f"item {self.id!r}: 'question' must be a non-blank string, got {self.question!r}")


@dataclass(frozen=True)
class OpenItem:
    """An open question, scored by greedy generation against reference answers.

    Args:
        id: the item's id, unique in its benchmark.
        question: the question text.
        answers: reference answers (alternatives, or annotator answers when there are 3 or more).
        image: the image file, or None for a text-only question.

    Raises:
        ValueError: a malformed item, named by its id.
    """

    id: str
    question: str
    answers: tuple[str, ...]  # reference answers (alternatives, or annotator answers when >= 3)
    image: Path | None = None

    def __post_init__(self) -> None:
        if not self.answers or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"item {self.id!r}: 'answers' must be a non-empty list of strings, "
                             f"got {list(self.answers)!r}")
        if not _non_blank(self.question):
            raise ValueError(f"item {self.id!r}: 'question' must be a non-blank string, got {self.question!r}")


@dataclass(frozen=True)
class TextItem:
    """A text passage on which next-token distributions are compared to a dense reference.

    Args:
        id: the item's id, unique in its benchmark.
        text: the passage.

    Raises:
        ValueError: a blank text.
    """

    id: str
    text: str

    @property
    def image(self) -> None:
        return None

    def __post_init__(self) -> None:
        if not _non_blank(self.text):
            raise ValueError(f"item {self.id!r}: 'text' must be a non-blank string, got {self.text!r}")


Item = Union[ChoiceItem, OpenItem, TextItem]
_ITEM_TYPES = {CHOICE: ChoiceItem, OPEN: OpenItem, FIDELITY: TextItem}


@dataclass
class Benchmark:
    """A named list of items of one kind.

    Args:
        name: the benchmark's name (the file stem when read by :func:`load_benchmark`).
        kind: ``'choice'``, ``'open'`` or ``'fidelity'``.
        items: its items, all of that kind.
        path: the JSONL file it was read from, if any.

    Raises:
        ValueError: an unknown kind, or items of another kind.
    """

    name: str
    kind: str  # 'choice', 'open' or 'fidelity'
    items: list[Item] = field(default_factory=list)
    path: Path | None = None  # the JSONL file it was read from, if any

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"benchmark kind must be one of {KINDS}, got {self.kind!r}")
        if not self.items:
            raise ValueError(f"benchmark {self.name!r} has no items")
        wrong = [item for item in self.items if not isinstance(item, _ITEM_TYPES[self.kind])]
        if wrong:
            raise ValueError(f"benchmark {self.name!r} of kind {self.kind!r} holds a {type(wrong[0]).__name__} "
                             f"(item {wrong[0].id!r})")
        ids = [item.id for item in self.items]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"benchmark {self.name!r}: item id {duplicate!r} appears more than once")

    def __len__(self) -> int:
        return len(self.items)


def item_kind(record: dict[str, Any]) -> str:
    """The kind of a raw JSON record, from its fields."""
    if "text" in record and "question" not in record:
        return FIDELITY
    if "options" in record or "answer" in record:
        return CHOICE
    if "answers" in record:
        return OPEN
    raise ValueError("cannot tell the item kind: expected 'options' + 'answer' (multiple choice), 'answers' "
                     f"(open answer) or 'text' (text fidelity); got fields {sorted(record)}")


def _image_path(record: dict[str, Any], folder: Path, allow_outside: bool = False) -> Path | None:
    value = record.get("image")
    if value is None:
        return None
    if not _non_blank(value):
        raise ValueError(f"'image' must be a path string or null, got {value!r}")
    path = folder / value  # an absolute value stays absolute
    if not allow_outside and not inside(path, folder):
        raise ValueError(f"image {value!r} is outside the benchmark's folder {str(folder)!r}; fix the path or "
                         "pass --allow-outside-paths")
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} does not exist")
    try:  # decoded in full: a corrupt file is caught here, not halfway through an evaluation
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"image {str(path)!r} is not a readable image ({err}); replace it or drop the item") \
            from None
    return path


def _strings(record: dict[str, Any], key: str) -> tuple[str, ...]:
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a list of strings, got {value!r}")
    return tuple(value)


def _required(record: dict[str, Any], key: str, kind: str) -> Any:
    if key not in record:
        raise ValueError(f"a {kind} item needs the field {key!r}; got fields {sorted(record)}")
    return record[key]


def parse_item(record: Any, folder: Path, allow_outside: bool = False) -> Item:
    """One raw JSON record -> a validated item (images resolved against ``folder``, inside it unless
    ``allow_outside``).

    Raises ValueError naming the bad field; :func:`load_benchmark` adds the file and line.
    """
    if not isinstance(record, dict):
        raise ValueError(f"each line must hold a JSON object, got {type(record).__name__}")
    kind = item_kind(record)
    raw_id = _required(record, "id", kind)
    if not isinstance(raw_id, (str, int)) or isinstance(raw_id, bool):
        raise ValueError(f"'id' must be a string or an integer, got {raw_id!r}")
    item_id = str(raw_id)
    if kind == FIDELITY:
        if record.get("image") is not None:
            raise ValueError(f"item {item_id!r}: fidelity items are text-only; drop 'image' or use a question item")
        return TextItem(item_id, _required(record, "text", kind))
    question = _required(record, "question", kind)
    image = _image_path(record, folder, allow_outside)
    if kind == CHOICE:
        if not record.get("options"):
            raise ValueError(f"item {item_id!r}: a multiple-choice item needs a non-empty 'options' list")
        return ChoiceItem(item_id, question, _strings(record, "options"), _required(record, "answer", kind), image)
    return OpenItem(item_id, question, _strings(record, "answers"), image)


def load_benchmark(path: str | Path, allow_outside: bool = False) -> Benchmark:
    """Read and validate a JSONL benchmark; its name is the file stem.

    Example::

        bench = load_benchmark("suite/digits.jsonl")   # Benchmark(name='digits', kind='choice', ...)

    Args:
        path: the JSON Lines file (one item per line; format in the module docstring).
        allow_outside: accept image paths outside the file's folder.

    Returns:
        The benchmark, every item checked.

    Raises:
        BenchmarkError: a missing or malformed file or item, named with its line.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {str(path)!r} does not exist")
    items: list[Item] = []
    first: tuple[str, int] | None = None  # (kind, line) of the first item
    seen: dict[str, int] = {}  # id -> line
    text = read_text(path, lambda err: BenchmarkError(f"benchmark file {str(path)!r} is not UTF-8 text (byte "
                                                       f"{err.start}); save it as UTF-8 JSON Lines"))
    try:
        for number, record in json_lines(text):
            where = f"{path}:{number}"
            try:
                item = parse_item(record, path.parent, allow_outside)
            except ValueError as err:
                raise BenchmarkError(f"{where}: {err}") from None
            kind = item_kind(record)
            if first is None:
                first = (kind, number)
            elif kind != first[0]:
                raise BenchmarkError(f"{where}: a {kind} item in a file of {first[0]} items (line {first[1]}); "
                                     "put each kind of item in its own file")
            if item.id in seen:
                raise BenchmarkError(f"{where}: item id {item.id!r} already used on line {seen[item.id]}")
            seen[item.id] = number
            items.append(item)
    except JsonLineError as err:
        why = "JSON nested too deeply to read" if err.too_deep else f"not valid JSON ({err.msg} at column {err.colno})"
        raise BenchmarkError(f"{path}:{err.number}: {why}") from None
    if first is None:
        raise BenchmarkError(f"benchmark file {str(path)!r} holds no items")
    return Benchmark(name=path.stem, kind=first[0], items=items, path=path)
