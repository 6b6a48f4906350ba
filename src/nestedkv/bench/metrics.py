"""Benchmark scores, computed as the benchmarks' own scorers (and kvpress's copies of them) do.

Every metric scores one prediction against the sample's reference strings, in [0, 100].

RULER (RULER's and kvpress's scorers):

* ``string_match_all`` (every task but QA): the fraction of the references found in the prediction
  (case-insensitive substring match).
* ``string_match_part`` (QA): 1 if any of the references is found.

LongBench / LongBench-E (THUDM/LongBench ``metrics.py``, as kvpress's ``calculate_metrics.py`` uses
it): the best score over the references of ``qa_f1_score`` (SQuAD token F1 after lower-casing and
removing punctuation and articles), ``rouge_score`` (ROUGE-L F of the ``rouge`` package),
``classification_score`` (needs the task's ``all_classes``), ``retrieval_score`` (``Paragraph N``),
``count_score``, ``code_sim_score`` (fuzzywuzzy's ``ratio``: difflib's ``SequenceMatcher`` ratio,
rounded to a percent, which is what fuzzywuzzy computes without python-Levenshtein) and their
Chinese variants (``qa_f1_zh_score`` and ``rouge_zh_score`` segment with ``jieba``, which must be
installed for them). The ``*_first_line`` variants score only the first line of the prediction, as
LongBench does for trec, triviaqa, samsum and lsht.

LooGLE (kvpress's ``loogle/calculate_metrics.py``): ``rouge_l_recall`` (the recall of the same
ROUGE-L; kvpress also reports BLEU, METEOR and BERTScore, not computed here) and, for the cloze
task, ``cloze_exact_match`` / ``cloze_partial_match`` (share of the masks answered).

InfiniteBench (InfiniteBench's ``compute_scores.py`` as kvpress adapts it): ``infinitebench_*``
scorers, one per task family, and ``qa_f1_score`` / ``qa_f1_zh_char_score`` for the book QA.

The ROUGE-L here is our own small reimplementation of the ``rouge`` package (1.0.x, the one LongBench
and kvpress import): sentences split at ``.``, words at spaces, the union of the words of the longest
common subsequences of every (reference sentence, prediction sentence) pair, counted as sets of
distinct words as that package does, and F = 2PR / (P + R + 1e-8). Where the package raises (an
empty prediction or reference) the score is 0, as LongBench and kvpress catch it.
"""

from __future__ import annotations

import ast
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from difflib import SequenceMatcher

from nestedkv.validation import check_choice

# A scorer takes the prediction, all the references and the task's classes and returns [0, 1].
_Scorer = Callable[[str, Sequence[str], Sequence[str]], float]
# A per-reference score, of which LongBench keeps the best over the references.
_PairScore = Callable[[str, str], float]


# --------------------------------------------------------------------------------------------
# RULER


def _found(prediction: str, answers: Sequence[str]) -> list[float]:
    text = prediction.lower()
    return [1.0 if answer.lower() in text else 0.0 for answer in answers]


def _all(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    return sum(_found(prediction, answers)) / len(answers)


def _part(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    return max(_found(prediction, answers))


# --------------------------------------------------------------------------------------------
# LongBench


_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》"
    + "「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """LongBench's Chinese normalisation: lower case, no (Chinese or ASCII) punctuation, no spaces."""
    return "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION and not ch.isspace())


def _token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing is shared)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def _qa_f1(prediction: str, reference: str) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _jieba_words(text: str) -> list[str]:
    """Words of ``text`` as jieba segments them (precise mode), as LongBench does for Chinese."""
    try:
        import jieba
    except ImportError as error:
        raise ImportError(
            "the Chinese LongBench metrics segment words with jieba, as LongBench does: pip install jieba"
        ) from error
    return list(jieba.cut(text, cut_all=False))


def _qa_f1_zh(prediction: str, reference: str) -> float:
    def tokens(text: str) -> list[str]:
        return [word for word in map(normalize_zh_answer, _jieba_words(text)) if word]

    return _token_f1(tokens(prediction), tokens(reference))


def _qa_f1_zh_chars(prediction: str, reference: str) -> float:
    """InfiniteBench's Chinese QA F1: one token per character after normalisation."""
    return _token_f1(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(reference)))


def _sentences(text: str) -> list[str]:
    """The ``rouge`` package's split: at every ``.``, whitespace collapsed, empty pieces dropped."""
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], candidate: list[str]) -> set[str]:
    """Words of one longest common subsequence, walked back as the ``rouge`` package does."""
    rows, cols = len(reference), len(candidate)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if reference[i - 1] == candidate[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), rows, cols
    while i and j:
        if reference[i - 1] == candidate[j - 1]:
            words.add(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> tuple[float, float, float]:
    """Summary-level ROUGE-L (precision, recall, F) of the ``rouge`` package; zeros where it raises."""
    predicted, referenced = _sentences(prediction), _sentences(reference)
    if not predicted or not referenced:
        return 0.0, 0.0, 0.0
    predicted_words = [sentence.split(" ") for sentence in predicted]
    referenced_words = [sentence.split(" ") for sentence in referenced]
    union: set[str] = set()
    for reference_words in referenced_words:
        for candidate in predicted_words:
            union |= _lcs_words(reference_words, candidate)
    precision = len(union) / len({word for words in predicted_words for word in words})
    recall = len(union) / len({word for words in referenced_words for word in words})
    return precision, recall, 2.0 * precision * recall / (precision + recall + 1e-8)


def _rouge_f(prediction: str, reference: str) -> float:
    return rouge_l(prediction, reference)[2]


def _rouge_recall(prediction: str, reference: str) -> float:
    return rouge_l(prediction, reference)[1]


def _rouge_zh(prediction: str, reference: str) -> float:
    return _rouge_f(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(reference)))


def _numbers_equal_share(prediction: str, target: str) -> float:
    """Share of the numbers in ``prediction`` that equal ``target`` (0 if it has none)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(number == target for number in numbers) / len(numbers) if numbers else 0.0


def _count(prediction: str, reference: str) -> float:
    return _numbers_equal_share(prediction, reference)


def _retrieval(pattern: str) -> _PairScore:
    def score(prediction: str, reference: str) -> float:
        found = re.findall(pattern, reference)
        if not found:
            raise ValueError(f"reference {reference!r} does not name a paragraph ({pattern})")
        return _numbers_equal_share(prediction, found[0])

    return score


def _code_sim(prediction: str, reference: str) -> float:
    """fuzzywuzzy's ``ratio`` (pure-Python path) between the first line that is not a comment or
    a code fence and the reference line."""
    line = next(
        (line for line in prediction.lstrip("\n").split("\n") if not any(mark in line for mark in ("`", "#", "//"))),
        "",
    )
    if line == reference:  # fuzzywuzzy checks equality before emptiness
        return 1.0
    if not line or not reference:
        return 0.0
    return round(100 * SequenceMatcher(None, line, reference).ratio()) / 100


def _classification(prediction: str, answers: Sequence[str], classes: Sequence[str]) -> float:
    """LongBench's classification score, best over references: 1 / (number of classes named in the
    prediction) when the right class is among them. Classes contained in the reference (but not
    equal to it) are dropped while walking the list, skipping the next entry as LongBench's loop
    that removes from the list it iterates does."""
    if not classes:
        raise ValueError("classification_score needs the task's classes (all_classes)")

    def score(reference: str) -> float:
        named = [name for name in classes if name in prediction]
        position = 0
        while position < len(named):
            if named[position] in reference and named[position] != reference:
                named.remove(named[position])
            position += 1
        return 1.0 / len(named) if reference in named else 0.0

    return max(score(reference) for reference in answers)


def _best_of(pair_score: _PairScore) -> _Scorer:
    """LongBench's rule: the best score over the references."""

    def scorer(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
        return max(pair_score(prediction, reference) for reference in answers)

    return scorer


def _first_line(scorer: _Scorer) -> _Scorer:
    """Score only the first line of the prediction (LongBench's trec, triviaqa, samsum, lsht)."""

    def wrapped(prediction: str, answers: Sequence[str], classes: Sequence[str]) -> float:
        return scorer(prediction.lstrip().split("\n")[0], answers, classes)

    return wrapped


# --------------------------------------------------------------------------------------------
# LooGLE cloze


def _cloze(exact: bool) -> _Scorer:
    """Share of the ``<mask-i>`` entities of the reference dict answered in the predicted dict
    (both read as Python literals): exactly, or sharing at least one word (partial)."""

    def scorer(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
        try:
            reference = ast.literal_eval(answers[0])
            count = len(reference)
        except Exception:  # kvpress counts an unreadable reference as one missed mask
            return 0.0
        try:
            predicted = ast.literal_eval(prediction)
            if not isinstance(predicted, dict):
                return 0.0
            if exact:
                hits = sum(predicted.get(key) == value for key, value in reference.items())
            else:
                hits = sum(
                    key in predicted and bool(set(reference[key].split()) & set(predicted[key].split()))
                    for key in reference
                )
        except Exception:  # an unreadable prediction answers nothing
            return 0.0
        return hits / count if count else 0.0

    return scorer


# --------------------------------------------------------------------------------------------
# InfiniteBench


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _blank_out(text: str, characters: str) -> str:
    for character in characters:
        text = text.replace(character, " ")
    return text


def _first_int(prediction: str) -> str:
    return next((piece for piece in re.split("[^0-9]", prediction) if piece), "")


def _ib_kv_retrieval(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    return float(answers[0] in _blank_out(prediction, "\n:\"'.,?!{}").split())


def _ib_first_int(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    return float(answers[0] == _first_int(prediction))


def _ib_code_run(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    words = _blank_out(prediction.strip(), "\n.`'\":").split()
    try:
        return float(bool(words) and int(words[-1]) == _number(answers[0]))
    except ValueError:
        return 0.0


def _after_prefix(text: str, prefixes: Sequence[str]) -> str | None:
    """What follows the first of ``prefixes`` found in ``text`` (and one separator); None when
    none is found, "" when the text ends there."""
    for prefix in prefixes:
        index = text.find(prefix)
        if index != -1:
            return text[index + len(prefix) + 1 :] if len(text) >= index + len(prefix) + 1 else ""
    return None


def _squeeze(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


def _ib_code_debug(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    """``answers`` = (the right function's name, its option letter)."""
    function, letter = answers[0], answers[1]
    prediction = prediction.strip()
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", prediction)
    if match and match.group(0) == letter:
        return 1.0
    prediction = prediction.strip()
    for mark in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        prediction = prediction.replace(mark, " ")
    prediction = _squeeze(prediction)
    if prediction.startswith(letter) or prediction.startswith(function):
        return 1.0
    rest = _after_prefix(prediction, ("answer is:", "is:", "answer:", "correct option is:"))
    return float(bool(rest) and (rest.startswith(letter) or rest.startswith(function)))


def _ib_math_find(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    target = _number(answers[0])
    found = re.search(r"\d+\.\d+|\d+", prediction)
    if found is None:
        return 0.0
    try:
        return float(type(target)(found.group(0).strip()) == target)
    except ValueError:  # a decimal where an integer is expected (upstream crashes on it)
        return 0.0


def _ib_math_calc(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    """Share of the expected values given in order before the first wrong one."""
    expected = [_number(value) for value in answers]
    given = [int(piece) for piece in re.split("[^0-9]", prediction) if piece]
    right = 0
    for want, got in zip(expected, given, strict=False):
        if want != got:
            break
        right += 1
    return right / len(expected)


def _ib_longdialogue(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    text = prediction.strip().upper()
    return float(any(answer.upper() in text for answer in answers))


def _ib_choice(prediction: str, answers: Sequence[str], _classes: Sequence[str]) -> float:
    """``answers`` = (the right option's text, its letter)."""
    prediction = prediction.strip()
    match = re.search(r"\b[A-D]\b(?!.*\b[A-D]\b)", prediction)
    if match and match.group(0) in answers:
        return 1.0
    if not prediction:
        return 0.0
    if prediction[0] in "ABCD":
        return float(prediction[0] in answers)
    if prediction in answers:
        return 1.0
    prediction = _squeeze(_blank_out(prediction, "\n\"'.,?!{}"))
    rest = _after_prefix(prediction, ("answer is:", "answer:", "answer is", "option is"))
    if rest is not None:
        return float(any(rest.startswith(answer) for answer in answers))
    return next((float(word in answers) for word in prediction.split() if word in "ABCD"), 0.0)


def reference_answer(metric: str, answers: Sequence[str], answer_prefix: str) -> str:
    """The text whose likelihood stands for a sample's answer (the runner's ``answer_nll``): every
    reference joined by ", " where ``metric`` needs all of them (``string_match_all``), else the first;
    after a space when the prompt's ``answer_prefix`` ends in a word, as RULER writes its solved examples."""
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    text = ", ".join(answers) if metric == "string_match_all" else answers[0]
    return (" " if answer_prefix and not answer_prefix[-1].isspace() else "") + text


# --------------------------------------------------------------------------------------------
# Registry


_SCORERS: dict[str, _Scorer] = {
    "string_match_all": _all,
    "string_match_part": _part,
    "qa_f1_score": _best_of(_qa_f1),
    "qa_f1_zh_score": _best_of(_qa_f1_zh),
    "qa_f1_zh_char_score": _best_of(_qa_f1_zh_chars),
    "rouge_score": _best_of(_rouge_f),
    "rouge_zh_score": _best_of(_rouge_zh),
    "rouge_l_recall": _best_of(_rouge_recall),
    "classification_score": _classification,
    "retrieval_score": _best_of(_retrieval(r"Paragraph (\d+)")),
    "retrieval_zh_score": _best_of(_retrieval(r"段落(\d+)")),
    "count_score": _best_of(_count),
    "code_sim_score": _best_of(_code_sim),
    "cloze_exact_match": _cloze(exact=True),
    "cloze_partial_match": _cloze(exact=False),
    "infinitebench_kv_retrieval": _ib_kv_retrieval,
    "infinitebench_first_int": _ib_first_int,
    "infinitebench_code_run": _ib_code_run,
    "infinitebench_code_debug": _ib_code_debug,
    "infinitebench_math_find": _ib_math_find,
    "infinitebench_math_calc": _ib_math_calc,
    "infinitebench_longdialogue_qa": _ib_longdialogue,
    "infinitebench_choice": _ib_choice,
}
for _name in ("qa_f1_score", "rouge_score", "classification_score"):
    _SCORERS[f"{_name}_first_line"] = _first_line(_SCORERS[_name])

METRICS: tuple[str, ...] = tuple(_SCORERS)
"""Every metric name a ``Sample.metric`` may hold."""


def score_sample(metric: str, prediction: str, answers: Sequence[str], *, all_classes: Sequence[str] = ()) -> float:
    """Score in [0, 100] of one prediction against its reference strings, with ``metric``.

    ``all_classes`` (LongBench's classes of trec / lsht) is needed by the classification metrics
    only; pass a hub sample's ``all_classes``.
    """
    scorer = _SCORERS[check_choice("metric", metric, METRICS)]
    if not answers:
        raise ValueError("a sample needs at least one reference answer")
    return 100.0 * scorer(prediction, answers, all_classes)

