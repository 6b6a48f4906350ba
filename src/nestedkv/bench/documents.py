"""Real long documents nobody here wrote, for two low-variance measures of what compression loses.

* ``continuation``: the first ``length`` tokens of a document are the context (compressed
  query-agnostically); the next :data:`CONTINUATION_TOKENS` are teacher-forced through the
  compressed cache. A record holds the increase in negative log-likelihood per token over the
  uncompressed cache (``delta_nll``, nats/token) and the share of those tokens whose greedy
  prediction is the uncompressed model's (``score``, in %).
* ``code-completion`` (LongBench's LCC, offline): a source file up to a line is the context, the
  model writes the next line; edit similarity (``code_sim_score``, first line).

The documents are the Python standard library's own source files (PSF License 2.0), read from the
interpreter that runs the benchmark (its version is recorded with every result), test suites and
vendored packages left out. Each document belongs to one split for good, from a hash of its path:
``dev`` (tuning) or ``test`` (reported tables), so no choice made on dev can have seen a test document.

torch is imported where tensors are made: the command line reads this module's names before it loads torch.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nestedkv.bench.ruler import Sample
from nestedkv.prompts import prompt_length
from nestedkv.validation import check_choice

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DOCUMENTS = "documents"
"""The benchmark's name (``nestedkv eval --benchmark documents``)."""
SPLITS = ("dev", "test")
CONTINUATION, CODE_COMPLETION = "continuation", "code-completion"
DOCUMENT_TASKS = (CONTINUATION, CODE_COMPLETION)
CONTINUATION_TOKENS = 256
"""Teacher-forced tokens after the context; the loss is measured on each of them."""

_CODE_QUESTION = "Next line of code:"
_CODE_INSTRUCTION = "Please complete the code given below. \n"  # LongBench's LCC prompt
_CODE_ANSWER_TOKENS = 64  # LongBench's lcc budget
_MIN_TARGET_CHARS = 12  # a target line worth predicting: not a brace, a blank or a lone `else:`
# Files with fewer characters than this per needed token are not even tokenized: source code
# averages well above it, so they could not hold the tokens.
_FEWEST_CHARS_PER_TOKEN = 2.5


@dataclass(frozen=True)
class ContinuationSample(Sample):
    """A :class:`Sample` measured by teacher forcing: ``context_ids (1, length)`` and the
    ``target_ids (1, CONTINUATION_TOKENS + 1)`` that follow (the first is fed, not scored)."""

    context_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """The split a document belongs to, for good: from the SHA-256 of its relative path."""
    return SPLITS[hashlib.sha256(name.encode()).digest()[0] % 2]


def documents(split: str, min_chars: int, root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library sources of ``split`` with at least
    ``min_chars`` characters, in a fixed order that does not depend on the file system."""
    check_choice("split", split, SPLITS)
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        name = path.relative_to(root).as_posix()
        parts = name.split("/")
        if parts[0] in ("test", "idlelib", "site-packages", "lib2to3") or "tests" in parts or "test" in parts:
            continue
        if split_of(name) != split or path.stat().st_size < min_chars:
            continue
        found.append(name)
    # an order that is a pure function of the names (a pseudo-random shuffle, not alphabetical:
    # the first documents would otherwise all come from one package)
    found.sort(key=lambda name: hashlib.sha256(f"order:{name}".encode()).hexdigest())
    return [(name, (root / name).read_text(encoding="utf-8", errors="replace")) for name in found]


def build_document_samples(
    task: str, n: int, tokenizer: PreTrainedTokenizerBase, length: int, split: str, root: Path | None = None
) -> list[Sample]:
    """``n`` samples of ``task`` whose context is ``length`` tokens long (``continuation``), or whose
    prompt fits in ``length`` tokens with the answer (``code-completion``); fewer if the split has
    fewer documents long enough. ``Sample.index`` is the document's rank in the split."""
    check_choice("task", task, DOCUMENT_TASKS)
    needed = length + (CONTINUATION_TOKENS + 1 if task == CONTINUATION else 0)
    build = _continuation if task == CONTINUATION else _code_completion
    samples = []
    for index, (name, text) in enumerate(documents(split, int(needed * _FEWEST_CHARS_PER_TOKEN), root)):
        sample = build(index, name, text, tokenizer, length)
        if sample is not None:
            samples.append(sample)
        if len(samples) == n:
            break
    return samples


def _continuation(
    index: int, name: str, text: str, tokenizer: PreTrainedTokenizerBase, length: int
) -> ContinuationSample | None:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < length + CONTINUATION_TOKENS + 1:
        return None
    import torch

    ids = torch.tensor([ids[: length + CONTINUATION_TOKENS + 1]])
    return ContinuationSample(
        task=CONTINUATION, index=index, context=name, question="", answer_prefix="", answers=(name,),
        max_new_tokens=0, metric=CONTINUATION, context_ids=ids[:, :length], target_ids=ids[:, length:],
    )


def _code_completion(
    index: int, name: str, text: str, tokenizer: PreTrainedTokenizerBase, length: int
) -> Sample | None:
    """The longest prefix of whole lines that fits ``length`` with the answer, cut before a line
    worth predicting (a line as LongBench's LCC targets: code, not a blank or a closing bracket)."""
    lines = text.splitlines(keepends=True)
    budget = length - _CODE_ANSWER_TOKENS
    # the number of whole lines that fit, by bisection on the prompt's token count
    low, high = 0, len(lines) - 1
    while low < high:
        middle = (low + high + 1) // 2
        context = _CODE_INSTRUCTION + "".join(lines[:middle])
        if prompt_length(tokenizer, context, _CODE_QUESTION) <= budget:
            low = middle
        else:
            high = middle - 1
    # the nearest line worth predicting at or before the cut, far enough in for a long context
    cut = next((k for k in range(low, low // 2, -1) if len(lines[k].strip()) >= _MIN_TARGET_CHARS
                and not lines[k].lstrip().startswith("#")), None)
    if cut is None or low < len(lines) // 4:
        return None
    return Sample(
        task=CODE_COMPLETION, index=index, context=_CODE_INSTRUCTION + "".join(lines[:cut]),
        question=_CODE_QUESTION, answer_prefix="", answers=(lines[cut].strip(),),
        max_new_tokens=_CODE_ANSWER_TOKENS, metric="code_sim_score",
    )


def greedy_agreement_and_nll(logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Teacher-forced quality of ``logits (T, vocab)`` against the uncompressed ``reference_logits
    (T, vocab)`` on ``targets (T,)``, the tokens that follow each position.

    ``-> {"nll": mean NLL (nats/token), "delta_nll": its increase over the reference, "score": % of
    positions whose argmax is the reference's argmax}``."""
    import torch

    nll = torch.nn.functional.cross_entropy(logits.float(), targets).item()
    reference = torch.nn.functional.cross_entropy(reference_logits.float(), targets).item()
    agreement = (logits.argmax(-1) == reference_logits.argmax(-1)).float().mean().item()
    return {"nll": nll, "delta_nll": nll - reference, "score": 100 * agreement}

