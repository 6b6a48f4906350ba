"""RULER's tasks built locally: length fitting, answers really in the context, determinism."""

import re
import uuid
from collections import Counter
from pathlib import Path

import pytest

from nestedkv.bench import ruler
from nestedkv.bench.metrics import score_sample
from nestedkv.bench.ruler import (
    TASKS,
    Sample,
    build_samples,
    essay_words,
    fit_size,
    read_hotpotqa,
    read_squad,
    split_sentences,
    task_names,
)
from nestedkv.prompts import encode_prompt

DATA = Path(__file__).parent / "data"
SQUAD = str(DATA / "squad_tiny.json")
HOTPOT = str(DATA / "hotpot_tiny.json")
TARGETS = (1024, 4096)
N = 2

# kvpress's split of RULER inputs (evaluation/benchmarks/ruler): the context ends where the last
# question starts, the answer prefix starts at the first answer anchor after it.
QUESTION_AT = {
    "niah": r"What (?:is|are all) the special magic",
    "vt": r"Question: Find all variables that are assigned the value",
    "cwe": r"Question: What are the 10 most common words in the above list\?",
    "fwe": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}
ANSWER_AT = {"niah": r"The special magic", "vt": "Answer:", "cwe": "Answer:", "fwe": "Answer:", "qa": "Answer:"}
GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


def family(task: str) -> str:
    return "qa" if "qa" in task else task.split("_")[0]


@pytest.fixture(scope="module")
def built(tokenizer):
    """Samples of every task at every target length, built once."""
    return {(task, target): build_samples(task, N, tokenizer, target) for task in TASKS for target in TARGETS}


def used_tokens(tokenizer, sample: Sample) -> int:
    context_ids, question_ids = encode_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    return context_ids.shape[1] + question_ids.shape[1] + sample.max_new_tokens


def test_task_list_is_rulers_13_in_order():
    assert len(TASKS) == 13 and TASKS[:8] == tuple(ruler._NIAH_TASKS)
    assert TASKS[8:] == ("vt", "cwe", "fwe", "synth_qa_1", "synth_qa_2")
    assert task_names() == TASKS
    assert task_names(squad_path=SQUAD, hotpot_path=HOTPOT)[-2:] == ("qa_1", "qa_2")
    assert task_names(hotpot_path=HOTPOT)[-2:] == ("synth_qa_1", "qa_2")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_fits_the_target_and_fills_it(built, tokenizer, task, target):
    samples = built[task, target]
    assert [s.index for s in samples] == list(range(N))
    for sample in samples:
        assert sample.task == task
        assert sample.max_new_tokens == GENERATE[family(task)]
        assert sample.metric == ("string_match_part" if family(task) == "qa" else "string_match_all")
        assert sample.answers and all(isinstance(a, str) and a for a in sample.answers)
        used = used_tokens(tokenizer, sample)
        assert 0.9 * target <= used <= target, (task, target, used)


@pytest.mark.parametrize("task", TASKS)
def test_prompt_splits_like_kvpress_ruler_data(built, task):
    """Joining the three parts and splitting them as kvpress does gives the same parts back."""
    for sample in built[task, 4096]:
        text = sample.context + sample.question + sample.answer_prefix
        start = list(re.finditer(QUESTION_AT[family(task)], text))[-1].start()
        tail = text[start:]
        cut = re.search(ANSWER_AT[family(task)], tail).start()
        assert (text[:start], tail[:cut], tail[cut:]) == (sample.context, sample.question, sample.answer_prefix)


NEEDLE = re.compile(r"One of the special magic (numbers|uuids|words) for (\S+) is: (\S+)\.")
FORMATS = {
    "numbers": re.compile(r"[1-9]\d{6}"),
    "uuids": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
}


def words_format(value: str) -> bool:
    adjective, _, noun = value.partition("-")
    return adjective in ruler._wonderwords("adjectivelist.txt") and noun in ruler._wonderwords("nounlist.txt")


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_needles_answers_and_distractors(built, task):
    config = ruler._NIAH_TASKS[task]
    for target in TARGETS:
        for sample in built[task, target]:
            needles = NEEDLE.findall(sample.context)
            assert all(kind == config.value_type for kind, _, _ in needles)
            query = re.search(r"special magic \w+ for (.+) mentioned", sample.question).group(1)
            queried = query.replace(", and ", ", ").split(", ")
            assert len(queried) == config.queries
            real = [(k, v) for _, k, v in needles if k in queried]
            assert sorted(v for _, v in real) == sorted(sample.answers)
            assert len(sample.answers) == config.queries * config.values
            keys = {k for _, k, _ in needles}
            if config.haystack == "needle":  # every line is a needle, distractor keys all different
                lines = sample.context.split("\n")[1:-1]
                assert len(lines) == len(needles) > 5 and len(keys) == len(needles)
            else:
                assert len(needles) == max(config.keys, config.queries) * config.values
                assert len(keys) == max(config.keys, config.queries)
            if config.haystack == "repeat":
                assert sample.context.count(ruler.NOISE) > 10
            if config.haystack == "essay":
                assert "It is a truth universally acknowledged" in sample.context
            for key, value in real:
                for kind, item in ((config.key_type, key), (config.value_type, value)):
                    assert words_format(item) if kind == "words" else FORMATS[kind].fullmatch(item)
                    if kind == "uuids":
                        assert uuid.UUID(item).version == 4
            single = config.queries * config.values == 1
            noun = config.value_type[:-1] if single else config.value_type
            assert sample.context.startswith(("A special magic " if single else "Some special magic ") + noun)
            assert sample.question.startswith("What is the" if single else "What are all the")
            assert sample.answer_prefix.endswith("mentioned in the provided text " + ("is" if single else "are"))


def test_vt_chain_and_one_shot_example(built):
    for target in TARGETS:
        for sample in built["vt", target]:
            value = re.search(r"assigned the value (\d+) in the text above", sample.question).group(1)
            assert f"5 variables are assigned the value {value}, they are: " in sample.answer_prefix
            example, _, task_text = sample.context.rpartition("\n\n\n\n")
            assignments = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", task_text))
            holders = {name for name, right in assignments.items() if right == value}
            while True:
                grown = holders | {n for n, right in assignments.items() if right.removeprefix("VAR ") in holders}
                if grown == holders:
                    break
                holders = grown
            assert holders == set(sample.answers) and len(sample.answers) == 5
            assert all(re.fullmatch(r"[A-Z]{5}", name) for name in sample.answers)
            assert task_text.count(ruler.NOISE) > 5
            solved = re.search(r"they are:  ([A-Z]{3}(?: [A-Z]{3}){4})$", example)
            assert solved, "the one-shot example ends with its 5 three-letter variables"
            assert example.startswith("Memorize and track the chain(s) of variable assignment")


def numbered(text: str) -> list[str]:
    return re.findall(r"\d+\. (.+?)(?= \d+\. |\n|$)", text)


def test_cwe_common_words_and_example(built):
    for target, (common, rare) in ((1024, (6, 1)), (4096, (30, 3))):
        for sample in built["cwe", target]:
            example, _, task_text = sample.context.rpartition("\nBelow is a numbered list of words.")
            counts = Counter(numbered(task_text.split("\n")[1]))
            assert {counts[word] for word in sample.answers} == {common}
            assert len(sample.answers) == 10 and set(counts.values()) == {common, rare}
            assert sum(1 for c in counts.values() if c == common) == 10
            example_answer = example.rpartition("most often in the list are: ")[2]
            assert len(numbered(example_answer)) == 10
            assert example.count("Question: What are the 10 most common words in the above list?") == 1


def test_fwe_top_three_coded_words(built):
    for target in TARGETS:
        for sample in built["fwe", target]:
            text = sample.context.split("coded words. ", 1)[1]
            ranked = Counter(text.split()).most_common()
            assert ranked[0][0] == "..."
            assert tuple(word for word, _ in ranked[1:4]) == sample.answers
            assert ranked[3][1] > ranked[4][1]
            assert all(re.fullmatch(r"[a-z]{6}", word) for word in sample.answers)


def documents(context: str) -> list[str]:
    body = context.split("The following are given documents.\n\n", 1)[1]
    return re.split(r"\n\n(?=Document \d+:\n)", body.strip())


@pytest.mark.parametrize("task", ["synth_qa_1", "synth_qa_2"])
def test_synthetic_qa_documents_and_answers(built, task):
    for target in TARGETS:
        for sample in built[task, target]:
            docs = documents(sample.context)
            assert [d.split(":\n", 1)[0] for d in docs] == [f"Document {i}" for i in range(1, len(docs) + 1)]
            assert len(docs) > (8 if target == 1024 else 40)
            (answer,) = sample.answers
            holding = [d for d in docs if answer in d]
            assert holding, "the answer is in a document"
            if task == "synth_qa_2":
                person = re.search(r"where (.+) was born\?|birthplace of (.+) best", sample.question)
                person = person.group(1) or person.group(2)
                (bio,) = [d for d in docs if f":\n{person}\n" in d]
                town = re.search(r"was born in (\w+) in", bio).group(1)
                assert answer not in bio
                (town_doc,) = [d for d in docs if f":\n{town}\n" in d]
                assert answer in town_doc


def test_squad_and_hotpot_readers():
    squad = read_squad(SQUAD)
    assert [item.question for item in squad.items] == [
        "Who first mapped Lake Orvanne?",
        "Which bird nests in the reed beds of the western bay?",
        "Since what year has the Brindle Clock struck the hours?",
        "Where does the copy of the Brindle Clock stand?",
    ]  # the impossible question is left out
    assert squad.items[0].answers == ("Ida Kestrel", "the surveyor Ida Kestrel")
    assert len(squad.documents) == 5
    assert len(squad.items[2].related) == 2 and squad.items[2].gold[0] not in squad.items[2].related
    hotpot = read_hotpotqa(HOTPOT)
    assert len(hotpot.items) == 3 and len(hotpot.documents) == 7  # shared paragraphs kept once
    assert hotpot.items[0].answers == ("Norlavia",) and len(hotpot.items[0].gold) == 4
    assert (
        "Quill Bridge\nThe Quill Bridge is a stone footbridge over the river Sade. It was"
        in hotpot.documents[hotpot.items[0].gold[0]]
    )


@pytest.mark.parametrize("task,path_arg,path", [("qa_1", "squad_path", SQUAD), ("qa_2", "hotpot_path", HOTPOT)])
def test_real_qa_tasks_from_files(tokenizer, task, path_arg, path):
    reader = read_squad if task == "qa_1" else read_hotpotqa
    data = reader(path)
    samples = build_samples(task, 5, tokenizer, 1024, **{path_arg: path})
    questions = set()
    for sample in samples:
        assert sample.task == task and sample.metric == "string_match_part" and sample.max_new_tokens == 32
        assert used_tokens(tokenizer, sample) <= 1024
        item = next(i for i in data.items if f"Question: {i.question} " in sample.question)
        questions.add(item.question)
        assert sample.answers == item.answers
        docs = documents(sample.context)
        assert len(docs) == len(data.documents)  # all fit: the tiny file holds few documents
        for gold in item.gold:
            assert any(d.endswith(":\n" + data.documents[gold]) for d in docs)
    assert len(questions) == min(5, len(data.items))
    with pytest.raises(ValueError, match=path_arg):
        build_samples(task, 1, tokenizer, 1024)


def test_unknown_task_and_too_short_target(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        build_samples("niah_single_9", 1, tokenizer, 4096)
    with pytest.raises(ValueError, match="too short"):
        build_samples("niah_single_2", 1, tokenizer, 200)
    with pytest.raises(ValueError, match="too short"):
        build_samples("cwe", 1, tokenizer, 400)
    assert build_samples("vt", 0, tokenizer, 1024) == []


def test_samples_are_deterministic_and_seeded(built, tokenizer):
    for task in ("niah_multikey_2", "vt", "cwe", "fwe", "synth_qa_2"):
        again = build_samples(task, N + 1, tokenizer, 1024)
        assert again[:N] == built[task, 1024]
        other = build_samples(task, 1, tokenizer, 1024, seed=1)
        assert other[0].context != again[0].context and other[0].answers != again[0].answers
        assert again[0].context != again[1].context


def test_fit_size_finds_the_largest_fitting_size():
    def length(size: int) -> int:
        return 100 + 7 * size

    assert fit_size(length, 4000, 1) == 557
    assert fit_size(length, 4000, 1, start=3000) == 557
    assert fit_size(length, 4000, 1, high=300) == 300
    assert fit_size(length, 50, 1) is None
    calls = []
    fit_size(lambda size: calls.append(size) or length(size), 100_000, 1, start=10_000)
    assert len(calls) < 20


def test_essay_haystack_is_austen_and_splits_into_sentences():
    words = essay_words()
    assert len(words) > 50_000 and words[:4] == ("It", "is", "a", "truth")
    assert "Graham" not in words
    header = (Path(ruler.__file__).parents[1] / "data" / "austen.txt").read_text().splitlines()[0]
    assert header.startswith("# Jane Austen (public domain)") and "r-cran-janeaustenr" in header
    assert split_sentences('He said so. "Mr. Bingley came!" she cried. And then? Nothing.') == [
        "He said so.",
        '"Mr. Bingley came!" she cried.',
        "And then?",
        "Nothing.",
    ]


def test_metrics_on_hand_cases():
    assert score_sample("string_match_all", "The numbers are 123 and 456.", ["123", "456"]) == 100.0
    assert score_sample("string_match_all", "only 123", ["123", "456", "789", "000"]) == 25.0
    assert score_sample("string_match_all", "NOTHING", ["abc"]) == 0.0
    assert score_sample("string_match_part", "It was IDA KESTREL.", ["the surveyor", "Ida Kestrel"]) == 100.0
    assert score_sample("string_match_part", "no idea", ["Ida Kestrel", "Kestrel"]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        score_sample("exact", "a", ["a"])
