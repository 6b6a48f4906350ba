"""RULER's 13 synthetic tasks, generated locally and offline.

This rebuilds the tasks of NVIDIA's RULER (``scripts/synthetic.yaml`` and the generators under
``scripts/data/synthetic/``) with its templates, answer prefixes, needle formats, needle counts,
one-shot examples and tokens to generate. Each prompt is split into context / question / answer
prefix exactly as kvpress's RULER dataset splits RULER's inputs (the context ends where the last
question starts; the answer prefix starts at ``The special magic`` or ``Answer:``), and its size is
fitted so that the whole prompt as ``nestedkv.prompts.encode_prompt`` builds it (chat template
included) plus the tokens to generate fits ``target_length`` tokens of the model's tokenizer.

Differences from RULER, all deliberate:

* the essay haystack is Jane Austen (``data/austen.txt``), not Paul Graham's essays;
* qa_1 / qa_2 need SQuAD and HotpotQA; without their files the tasks are ``synth_qa_1`` /
  ``synth_qa_2``, single-document and two-hop questions over invented towns and people, in
  RULER's QA format; they are not RULER's QA and are named so;
* randomness is a local ``random.Random`` per sample (seeded by task, seed and index), so any
  sample can be rebuilt alone; sentences are split by a small rule instead of NLTK;
* every sample's haystack is fitted to the target (RULER fits sample 0 and only shrinks others);
* vt's answer prefix spells "assigned" (older RULER versions had "assgined"); cwe stops growing
  at the size of its vocabulary (newer RULER then switches to another word list).
"""

from __future__ import annotations

import functools
import json
import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from nestedkv.prompts import prompt_length

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "synth_qa_1",
    "synth_qa_2",
)
"""The 13 tasks in RULER's order; the QA tasks are the synthetic stand-ins."""

REAL_QA_TASKS: tuple[str, ...] = ("qa_1", "qa_2")
"""RULER's QA tasks, built only from a user's SQuAD (qa_1) or HotpotQA (qa_2) file."""


@dataclass(frozen=True)
class Sample:
    """One benchmark prompt, split as kvpress's pipeline takes it."""

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int
    metric: str  # "string_match_all" | "string_match_part"


def task_names(squad_path: str | None = None, hotpot_path: str | None = None) -> tuple[str, ...]:
    """``TASKS``, with qa_1 / qa_2 in place of the synthetic QA when their files are given."""
    swap = {"synth_qa_1": "qa_1" if squad_path else None, "synth_qa_2": "qa_2" if hotpot_path else None}
    return tuple(swap.get(task) or task for task in TASKS)


# --------------------------------------------------------------------------------------------
# Shared pieces: word lists, haystacks, insertion of needles


NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
"""RULER's repeated filler sentence (the ``repeat`` haystack of niah, and vt's noise)."""

DEPTHS = tuple(round(i * 100 / 39) for i in range(40))
"""RULER's 40 needle depths (percent of the essay), evenly spaced from 0 to 100."""


@functools.cache
def _wonderwords(name: str) -> tuple[str, ...]:
    text = resources.files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
    return tuple(word.strip() for word in text.splitlines() if word.strip())


@functools.cache
def _common_words_vocabulary() -> tuple[str, ...]:
    """cwe's vocabulary: wonderwords' nouns, adjectives and verbs, deduplicated, sorted."""
    return tuple(sorted(set().union(*map(_wonderwords, ("nounlist.txt", "adjectivelist.txt", "verblist.txt")))))


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The words of the shipped public-domain essay haystack (Jane Austen), header skipped."""
    text = resources.files("nestedkv").joinpath("data").joinpath("austen.txt").read_text(encoding="utf-8")
    return tuple(" ".join(line for line in text.splitlines() if not line.startswith("#")).split())


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Messrs.", "Col.", "Capt.", "Sir.")


def split_sentences(text: str) -> list[str]:
    """Split prose after ``.``, ``!`` or ``?`` followed by a capital (not after ``Mr.`` and such)."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        if text[start : match.start() + 1].endswith(_ABBREVIATIONS):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    return sentences + [tail] if tail else sentences


def _essay(num_words: int) -> list[str]:
    """The first ``num_words`` words of the essay (cycled if needed), split into sentences."""
    words = essay_words()
    repeats = -(-num_words // len(words))
    return split_sentences(" ".join((words * repeats)[:num_words]))


def _insert_at_depths(sentences: list[str], needles: Sequence[str], rng: random.Random) -> str:
    """RULER's essay insertion: each needle after the sentence at a distinct sampled depth."""
    cuts = sorted(len(sentences) * depth // 100 for depth in rng.sample(DEPTHS, len(needles)))
    pieces, previous = [], 0
    for cut, needle in zip(cuts, needles, strict=True):
        pieces += [*sentences[previous:cut], needle]
        previous = cut
    return " ".join(pieces + sentences[previous:])


def _scatter(items: list[str], inserts: Sequence[str], rng: random.Random) -> list[str]:
    """Insert ``inserts``, in order, before distinct random positions of ``items``."""
    positions = sorted(rng.sample(range(len(items)), len(inserts)))
    result = list(items)
    for offset, (position, insert) in enumerate(zip(positions, inserts, strict=True)):
        result.insert(position + offset, insert)
    return result


def _distinct(draw: Callable[[], str], count: int, taken: set[str] | None = None) -> list[str]:
    """``count`` new values of ``draw()``, distinct from each other and from ``taken``."""
    taken = set() if taken is None else taken
    values: list[str] = []
    misses = 0
    while len(values) < count:
        value = draw()
        if value in taken:
            misses += 1
            if misses > 10_000:
                raise RuntimeError(f"cannot draw {count} distinct values (got {len(values)})")
            continue
        taken.add(value)
        values.append(value)
    return values


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, start=1))


@dataclass(frozen=True)
class _Prompt:
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]


# A generator builds the prompt of sample ``index`` with a haystack of ``size`` units (words,
# lines, documents...) from that sample's own random generator.
_Generator = Callable[[random.Random, int, int], _Prompt]


@dataclass(frozen=True)
class _Spec:
    generate: _Generator
    max_new_tokens: int
    min_size: int
    max_size: int | None = None
    metric: str = "string_match_all"


# --------------------------------------------------------------------------------------------
# niah: needle in a haystack


_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_NIAH_CONTEXT = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{haystack}\n"
)
_NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text? "
_NIAH_ANSWER = "The special magic {kind} for {query} mentioned in the provided text are"


@dataclass(frozen=True)
class _Niah:
    """One row of RULER's synthetic.yaml for the niah generator."""

    haystack: str  # "repeat" (the noise sentence), "essay" or "needle" (distractor needles)
    key_type: str  # "words" | "numbers" | "uuids"
    value_type: str
    keys: int = 1
    values: int = 1
    queries: int = 1


_NIAH_TASKS = {
    "niah_single_1": _Niah("repeat", "words", "numbers"),
    "niah_single_2": _Niah("essay", "words", "numbers"),
    "niah_single_3": _Niah("essay", "words", "uuids"),
    "niah_multikey_1": _Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": _Niah("needle", "words", "numbers"),
    "niah_multikey_3": _Niah("needle", "uuids", "uuids"),
    "niah_multivalue": _Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": _Niah("essay", "words", "numbers", queries=4),
}


def random_needle_item(rng: random.Random, kind: str) -> str:
    """A 7-digit number, an adjective-noun word (wonderwords) or a UUID, as in RULER."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(_wonderwords('adjectivelist.txt'))}-{rng.choice(_wonderwords('nounlist.txt'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _niah(config: _Niah, rng: random.Random, size: int, _index: int) -> _Prompt:
    """Needles "One of the special magic {values} for {key} is: {value}." hidden in a haystack."""
    taken: set[str] = set()
    keys = _distinct(lambda: random_needle_item(rng, config.key_type), max(config.keys, config.queries), taken)
    values = [[random_needle_item(rng, config.value_type) for _ in range(config.values)] for _ in keys]
    needles = [
        _NEEDLE.format(kind=config.value_type, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs
    ]
    rng.shuffle(needles)
    if config.haystack == "essay":
        haystack = _insert_at_depths(_essay(size), needles, rng)
    else:
        if config.haystack == "repeat":
            filler = [NOISE] * size
        else:  # distractor needles, with keys other than the real ones
            fake_keys = _distinct(lambda: random_needle_item(rng, config.key_type), size, taken)
            filler = [
                _NEEDLE.format(kind=config.value_type, key=k, value=random_needle_item(rng, config.value_type))
                for k in fake_keys
            ]
        haystack = "\n".join(_scatter(filler, needles, rng))
    chosen = rng.sample(range(len(keys)), config.queries)
    queried = [keys[i] for i in chosen]
    query = queried[0] if len(queried) == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    templates, kind = (_NIAH_CONTEXT, _NIAH_QUESTION, _NIAH_ANSWER), config.value_type
    if config.queries * config.values == 1:  # RULER's singular wording for one answer
        templates = tuple(t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in templates)
        kind = kind[:-1]
    context, question, answer_prefix = (t.format(kind=kind, query=query, haystack=haystack) for t in templates)
    return _Prompt(context, question, answer_prefix, tuple(v for i in chosen for v in values[i]))


# --------------------------------------------------------------------------------------------
# vt: variable tracking


_VT_CONTEXT = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{haystack}\n"
_VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above. "
_VT_ANSWER = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{count} variables are assigned the value {value}, they are: "
)
_VT_HOPS = 4
_VT_EXAMPLE_TOKENS = 500  # RULER fits its one-shot example to 500 tokens, 30 of them to generate


def _vt_prompt(rng: random.Random, noises: int, name_length: int) -> _Prompt:
    """One chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of 4 hops in repeated noise lines."""
    letters = string.ascii_uppercase
    names = _distinct(lambda: "".join(rng.choices(letters, k=name_length)), _VT_HOPS + 1)
    value = str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names[:-1], names[1:], strict=True)]
    haystack = " ".join(_scatter([NOISE + "\n"] * noises, chain, rng)).replace(". \n", ".\n")
    return _Prompt(
        _VT_CONTEXT.format(haystack=haystack),
        _VT_QUESTION.format(value=value),
        _VT_ANSWER.format(count=len(names), value=value),
        tuple(names),
    )


def _solved(example: _Prompt, answer: str) -> str:
    """A one-shot example as RULER writes it: the whole prompt, a space, then its answer."""
    return example.context + example.question + example.answer_prefix + " " + answer


def _vt(example_noises: int, rng: random.Random, size: int, _index: int) -> _Prompt:
    """RULER's vt (1 chain, 4 hops), after a solved one-shot example with 3-letter variables."""
    example = _vt_prompt(rng, example_noises, name_length=3)
    example_text = _solved(example, " ".join(example.answers))
    task = _vt_prompt(rng, size, name_length=5)
    return _Prompt(example_text + "\n\n\n\n" + task.context, task.question, task.answer_prefix, task.answers)


def _vt_example_noises(tokenizer: PreTrainedTokenizerBase) -> int:
    """Noise lines of the one-shot example: as many as fit RULER's 500-token example budget."""

    def length(noises: int) -> int:
        example = _vt_prompt(random.Random(0), noises, name_length=3)
        return len(tokenizer.encode(_solved(example, " ".join(example.answers)), add_special_tokens=False))

    return fit_size(length, _VT_EXAMPLE_TOKENS - 30, _VT_HOPS + 1) or _VT_HOPS + 1


# --------------------------------------------------------------------------------------------
# cwe: common words extraction


_CWE_CONTEXT = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{words}\n"
)
_CWE_QUESTION = "Question: What are the 10 most common words in the above list? "
_CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
_CWE_COMMON = 10


def _cwe_prompt(rng: random.Random, num_words: int, common: int, uncommon: int) -> _Prompt:
    """A numbered list of ``num_words`` distinct words, 10 of them ``common`` times, the rest
    ``uncommon`` times, shuffled."""
    words = rng.sample(_common_words_vocabulary(), num_words)
    listed = words[:_CWE_COMMON] * common + words[_CWE_COMMON:] * uncommon
    rng.shuffle(listed)
    context = _CWE_CONTEXT.format(words=_numbered(listed))
    return _Prompt(context, _CWE_QUESTION, _CWE_ANSWER, tuple(words[:_CWE_COMMON]))


def _cwe(short: bool, rng: random.Random, size: int, _index: int) -> _Prompt:
    """10 words repeated 30 times among words repeated 3 times (6 and 1 below 4k tokens),
    after a solved one-shot example of 40 words (10 / 3 repeats; 20 words, 3 / 1 below 4k)."""
    example = _cwe_prompt(rng, *((20, 3, 1) if short else (40, 10, 3)))
    task = _cwe_prompt(rng, size, *((6, 1) if short else (30, 3)))
    example_text = _solved(example, _numbered(example.answers))
    return _Prompt(example_text + "\n" + task.context, task.question, task.answer_prefix, task.answers)


# --------------------------------------------------------------------------------------------
# fwe: frequent words extraction


_FWE_CONTEXT = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {text}\n"
)
_FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? "
)
_FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"
_FWE_ALPHA = 2.0


@functools.cache
def _zeta(alpha: float, terms: int = 10_000) -> float:
    """Riemann zeta for alpha > 1: a partial sum plus the integral of the tail."""
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


def _fwe(vocab_size: int, rng: random.Random, size: int, _index: int) -> _Prompt:
    """Coded 6-letter words with Zipf counts (alpha 2) over ``target_length // 50`` words; the
    most frequent one is '...' noise; the answer is the next three."""
    vocab = _distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=6)), vocab_size)
    vocab[0] = "..."
    scale = size / _zeta(_FWE_ALPHA)
    words = [word for rank, word in enumerate(vocab, start=1) for _ in range(int(scale * rank**-_FWE_ALPHA))]
    rng.shuffle(words)
    return _Prompt(_FWE_CONTEXT.format(text=" ".join(words)), _FWE_QUESTION, _FWE_ANSWER, tuple(vocab[1:4]))


# --------------------------------------------------------------------------------------------
# qa: question answering over documents (real SQuAD / HotpotQA files, or synthetic)


_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
_QA_CONTEXT = _QA_INSTRUCTION + "\n\nThe following are given documents.\n\n{documents}\n\n"
_QA_QUESTION = _QA_INSTRUCTION + "\n\nQuestion: {question} "
_QA_ANSWER = "Answer:"


@dataclass(frozen=True)
class QAItem:
    """One question: its answers, the documents holding them, and same-topic documents."""

    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]
    related: tuple[int, ...] = ()


@dataclass(frozen=True)
class QADataset:
    items: tuple[QAItem, ...]
    documents: tuple[str, ...]


def _index_documents(texts: Sequence[str]) -> tuple[tuple[str, ...], dict[str, int]]:
    documents = tuple(sorted(set(texts)))
    return documents, {text: i for i, text in enumerate(documents)}


def read_squad(path: str) -> QADataset:
    """SQuAD (v2 or v1.1 json): answerable questions; a question's gold document is its paragraph
    and the other paragraphs of its article come first as distractors (as RULER's qa_1)."""
    with open(path, encoding="utf-8") as file:
        articles = json.load(file)["data"]
    documents, ids = _index_documents([p["context"] for a in articles for p in a["paragraphs"]])
    items = []
    for article in articles:
        siblings = [ids[p["context"]] for p in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            gold = ids[paragraph["context"]]
            for qa in paragraph["qas"]:
                if qa.get("is_impossible", False) or not qa["answers"]:
                    continue
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                items.append(QAItem(qa["question"], answers, (gold,), tuple(i for i in siblings if i != gold)))
    return QADataset(tuple(items), documents)


def read_hotpotqa(path: str) -> QADataset:
    """HotpotQA (json list): all paragraphs given with a question (gold and distractors) are its
    documents, each as ``title\\ntext`` (as RULER's qa_2)."""
    with open(path, encoding="utf-8") as file:
        records = json.load(file)

    def text(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    documents, ids = _index_documents([text(t, s) for r in records for t, s in r["context"]])
    items = tuple(
        QAItem(r["question"], (r["answer"],), tuple(dict.fromkeys(ids[text(t, s)] for t, s in r["context"])))
        for r in records
    )
    return QADataset(items, documents)


def _qa_prompt(documents: Sequence[str], question: str, answers: tuple[str, ...]) -> _Prompt:
    listed = "\n\n".join(f"Document {i}:\n{doc}" for i, doc in enumerate(documents, start=1))
    return _Prompt(_QA_CONTEXT.format(documents=listed), _QA_QUESTION.format(question=question), _QA_ANSWER, answers)


def _real_qa(data: QADataset, order: Sequence[int], rng: random.Random, size: int, index: int) -> _Prompt:
    """RULER's qa: the gold documents, then same-topic ones, then random others, shuffled."""
    item = data.items[order[index % len(order)]]
    extra = size - len(item.gold)
    if extra <= len(item.related):
        chosen = list(item.gold) + rng.sample(item.related, extra)
    else:
        known = set(item.gold) | set(item.related)
        others = [i for i in range(len(data.documents)) if i not in known]
        chosen = [*item.gold, *item.related, *rng.sample(others, min(extra - len(item.related), len(others)))]
    rng.shuffle(chosen)
    return _qa_prompt([data.documents[i] for i in chosen], item.question, item.answers)


_SYLLABLES = tuple(
    "al bar cen dor el fal gan hel ir jas kor lin mor nel or pra quen ril sol tam ur vel wen yor zan "
    "ash bel cor dun em fen gil hal ith lo mar ne os pen".split()
)
_TOWN_ENDINGS = ("ford", "wick", "mere", "holt", "stead", "bury", "haven", "dale", "port", "field")
_PROFESSIONS = tuple(
    "clockmaker cartographer glassblower botanist shipwright astronomer apothecary weaver bookbinder "
    "stonemason beekeeper lamplighter cooper engraver falconer".split()
)
_PRODUCTS = (
    "copper kettles",
    "blue glass",
    "salted herring",
    "wool blankets",
    "pear cider",
    "silver thread",
    "lacquered boxes",
    "river pearls",
    "goose quills",
    "rope and sailcloth",
    "honey cakes",
    "slate roofs",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_TOWN_KINDS = ("small", "busy", "quiet", "walled", "hillside", "riverside")

_TOWN_QUESTIONS = (
    ("Who founded {town}?", "founder"),
    ("In which province is {town}?", "province"),
    ("On which river does {town} lie?", "river"),
    ("What is {town} best known for?", "product"),
)
_PERSON_QUESTIONS = (
    ("In which town was {person} born?", "birthplace"),
    ("What was the profession of {person}?", "profession"),
    ("In what year was {person} born?", "born"),
)
_BRIDGE_QUESTIONS = (
    ("In which province is the town where {person} was born?", "province"),
    ("Who founded the town where {person} was born?", "founder"),
    ("On which river lies the town where {person} was born?", "river"),
    ("What is the birthplace of {person} best known for?", "product"),
)


def _invented_world(rng: random.Random, num_documents: int) -> tuple[list[dict], list[dict]]:
    """Invented towns (half the documents, at least one) and people born in them; the names of
    towns and people (founders included) are all different."""
    taken: set[str] = set()

    def name(syllables: int, ending: str = "") -> str:
        return ("".join(rng.choices(_SYLLABLES, k=syllables)) + ending).capitalize()

    def unique(draw: Callable[[], str]) -> str:
        return _distinct(draw, 1, taken)[0]

    def person() -> str:
        return unique(lambda: f"{name(2)} {name(3)}")

    towns = []
    for _ in range(max(1, (num_documents + 1) // 2)):
        town = {
            "town": unique(lambda: name(2, rng.choice(_TOWN_ENDINGS))),
            "province": name(3, "ia"),
            "river": name(2),
            "founder": person(),
            "year": str(rng.randint(1150, 1799)),
            "product": rng.choice(_PRODUCTS),
            "kind": rng.choice(_TOWN_KINDS),
            "weekday": rng.choice(_WEEKDAYS),
        }
        town["text"] = (
            f"{town['town']} is a {town['kind']} market town in the province of {town['province']}, on the "
            f"banks of the river {town['river']}. It was founded in {town['year']} by {town['founder']}. "
            f"The town is best known for its {town['product']}, and its market is held every "
            f"{town['weekday']}."
        )
        towns.append(town)
    people = []
    for _ in range(num_documents - len(towns)):
        full = person()
        first = full.split()[0]
        who = {
            "person": full,
            "birthplace": rng.choice(towns)["town"],
            "workplace": rng.choice(towns)["town"],
            "born": str(rng.randint(1700, 1899)),
            "profession": rng.choice(_PROFESSIONS),
        }
        who["text"] = (
            f"{who['person']} was born in {who['birthplace']} in {who['born']}. {first} trained as a "
            f"{who['profession']} and later spent many years in {who['workplace']}, where {first} was known "
            f"as a patient and careful worker."
        )
        people.append(who)
    return towns, people


def _synth_qa(two_hop: bool, rng: random.Random, size: int, _index: int) -> _Prompt:
    """synth_qa_1: a question answered by one document among ``size`` documents on invented towns
    and people (SQuAD-like, untitled). synth_qa_2: a two-hop question, person -> birthplace -> a fact
    of that town, needing both documents (HotpotQA-like, documents titled)."""
    towns, people = _invented_world(rng, size)
    by_town = {t["town"]: t for t in towns}
    if two_hop:
        who = people[0]
        template, field = rng.choice(_BRIDGE_QUESTIONS)
        question, answer = template.format(person=who["person"]), by_town[who["birthplace"]][field]
    else:
        entity = rng.choice(towns + people)
        template, field = rng.choice(_PERSON_QUESTIONS if "person" in entity else _TOWN_QUESTIONS)
        question, answer = template.format(**entity), entity[field]
    entities = towns + people
    documents = [f"{e.get('town') or e['person']}\n{e['text']}" if two_hop else e["text"] for e in entities]
    rng.shuffle(documents)
    return _qa_prompt(documents, question, (answer,))


# --------------------------------------------------------------------------------------------
# Task table and length fitting


_TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


def _spec(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    target_length: int,
    seed: int,
    squad_path: str | None,
    hotpot_path: str | None,
) -> _Spec:
    if task in _NIAH_TASKS:
        config = _NIAH_TASKS[task]
        needles = max(config.keys, config.queries) * config.values
        return _Spec(functools.partial(_niah, config), _TOKENS_TO_GENERATE["niah"], min_size=needles)
    if task == "vt":
        generate = functools.partial(_vt, _vt_example_noises(tokenizer))
        return _Spec(generate, _TOKENS_TO_GENERATE["vt"], min_size=_VT_HOPS + 1)
    if task == "cwe":
        generate = functools.partial(_cwe, target_length < 4096)
        return _Spec(generate, _TOKENS_TO_GENERATE["cwe"], _CWE_COMMON + 1, len(_common_words_vocabulary()))
    if task == "fwe":
        return _Spec(functools.partial(_fwe, max(target_length // 50, 5)), _TOKENS_TO_GENERATE["fwe"], min_size=50)
    if task in ("synth_qa_1", "synth_qa_2"):
        two_hop = task == "synth_qa_2"
        generate = functools.partial(_synth_qa, two_hop)
        return _Spec(generate, _TOKENS_TO_GENERATE["qa"], 2 if two_hop else 1, metric="string_match_part")
    if task in REAL_QA_TASKS:
        path, reader, kind = (
            (squad_path, read_squad, "squad_path (a SQuAD json)")
            if task == "qa_1"
            else (hotpot_path, read_hotpotqa, "hotpot_path (a HotpotQA json)")
        )
        if not path:
            raise ValueError(f"task {task!r} needs {kind}; without it use synth_{task}")
        data = reader(path)
        if not data.items:
            raise ValueError(f"{path} holds no answerable question")
        order = list(range(len(data.items)))
        random.Random(f"{task}:{seed}:order").shuffle(order)
        generate = functools.partial(_real_qa, data, order)
        min_docs = max(len(item.gold) for item in data.items)
        return _Spec(generate, _TOKENS_TO_GENERATE["qa"], min_docs, len(data.documents), "string_match_part")
    raise ValueError(f"unknown RULER task {task!r}; choose one of {TASKS + REAL_QA_TASKS}")


def fit_size(
    length: Callable[[int], int], budget: int, low: int, high: int | None = None, start: int | None = None
) -> int | None:
    """Largest size in [low, high] (no upper bound if None) with ``length(size) <= budget``.

    ``length`` is taken as increasing and roughly linear: proportional steps from ``start`` until
    the answer is bracketed, then interpolation alternating with bisection. It stops one unit
    below a size that does not fit, or within 0.5 % of the budget. None if ``low`` does not fit.
    """
    slack = budget // 200
    good = bad = None  # largest size known to fit, smallest known not to, with their lengths
    good_used = bad_used = 0
    size, bisect = max(low, start or low), False
    while True:
        if high is not None:
            size = min(size, high)
        used = length(size)
        if used <= budget:
            good, good_used = size, used
            if budget - used <= slack or size == high:
                return good
        else:
            bad, bad_used = size, used
        if good is None:
            if size == low:
                return None
            size = max(low, min(size - 1, size * budget // used))
        elif bad is None:
            size = max(size + 1, size * budget // max(used, 1))
        elif bad - good <= 1:
            return good
        else:
            step = (bad - good) // 2 if bisect else (budget - good_used) * (bad - good) // (bad_used - good_used)
            size, bisect = min(max(good + step, good + 1), bad - 1), not bisect


def build_samples(
    task: str,
    n: int,
    tokenizer: PreTrainedTokenizerBase,
    target_length: int,
    seed: int = 0,
    squad_path: str | None = None,
    hotpot_path: str | None = None,
) -> list[Sample]:
    """``n`` samples of ``task`` whose prompt plus tokens to generate fit ``target_length`` tokens.

    Each sample gets the largest haystack that fits (to 0.5 %), searched from the size found for
    sample 0 (RULER calibrates on one sample and only shrinks the others). Sample ``i`` depends
    only on (task, seed, i, target length, tokenizer): the first samples are the same whatever
    ``n``. ``qa_1`` / ``qa_2`` need ``squad_path`` / ``hotpot_path``. Raises ``ValueError`` for
    an unknown task or a target length too short for the task.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = _spec(task, tokenizer, target_length, seed, squad_path, hotpot_path)
    budget = target_length - spec.max_new_tokens

    def make(index: int, size: int) -> _Prompt:
        return spec.generate(random.Random(f"{task}:{seed}:{index}"), size, index)

    def length(index: int, size: int) -> int:
        prompt = make(index, size)
        return prompt_length(tokenizer, prompt.context, prompt.question, prompt.answer_prefix)

    def fit(index: int, start: int | None) -> int:
        size = fit_size(functools.partial(length, index), budget, spec.min_size, spec.max_size, start)
        if size is None:
            raise ValueError(
                f"target_length {target_length} is too short for task {task!r}: its smallest prompt "
                f"takes {length(index, spec.min_size)} tokens, plus {spec.max_new_tokens} to generate"
            )
        return size

    if n == 0:
        return []
    first = fit(0, None)
    samples = []
    for index in range(n):
        prompt = make(index, first if index == 0 else fit(index, first))
        samples.append(
            Sample(
                task,
                index,
                prompt.context,
                prompt.question,
                prompt.answer_prefix,
                prompt.answers,
                spec.max_new_tokens,
                spec.metric,
            )
        )
    return samples
