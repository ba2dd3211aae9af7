"""Tests of arrtune.evaluation on the tiny random Llama of conftest.py (built once per session)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from arrtune.errors import ArrtuneError
from arrtune.evaluation import (
    BENCHMARKS,
    EvalConfig,
    MCItem,
    evaluate_model_pair,
    evaluate_single,
    format_table,
    load_benchmark,
    load_jsonl_benchmark,
    loglikelihoods,
    score_items,
    text_metrics,
    write_eval_json,
)
from arrtune.evaluation.scoring import encode_pair
from arrtune.evaluation.text import score_sequences
from arrtune.generation import (
    generate,
    leak_vocabulary,
    leaked_words,
    question_prompt_ids,
    task_example,
)
from arrtune.models import load_model, load_tokenizer


@pytest.fixture
def tiny(tiny_model_dir):
    """A fresh copy of the session's tiny random Llama (conftest.py) and its tokenizer."""
    model = load_model(str(tiny_model_dir))
    model.eval()
    return model, load_tokenizer(str(tiny_model_dir))


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Independent scoring of one pair: harness token split, full forward, full log-softmax."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + t, tok].item() for t, tok in enumerate(cont))


HAND_MADE = [
    ("Question: What is the colour of the sky?\nAnswer:", ["blue", "green", "a loud noise"]),
    ("Question: Where do fish live?\nAnswer:", ["in the water", "on the moon"]),
    ("The river ran past the old stone house and", ["the children sang", "seven", "bread and fire"]),
]


def test_mc_scoring_hand_made_items(tiny):
    model, tok = tiny
    expected_ll = [[reference_loglikelihood(model, tok, p, " " + c) for c in cs] for p, cs in HAND_MADE]
    best = [max(range(len(ll)), key=ll.__getitem__) for ll in expected_ll]
    # items 0 and 1 labelled with the model's own best choice, item 2 with a different one
    labels = [best[0], best[1], (best[2] + 1) % 3]
    items = [MCItem(p, tuple(cs), label) for (p, cs), label in zip(HAND_MADE, labels)]
    result = score_items(model, tok, items, name="hand", batch_size=2)
    for got, want in zip(result.loglikelihoods, expected_ll):
        assert got == pytest.approx(want, abs=1e-4)
    assert result.correct == [1, 1, 0]
    metrics = result.metrics()
    assert metrics["hand/acc"] == pytest.approx(2 / 3)
    assert metrics["hand/acc_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert metrics["hand/n"] == 3
    assert result.items_per_s > 0


def test_packed_scoring_equals_pairwise_scoring(tiny):
    model, tok = tiny
    items = [
        *load_benchmark("arc_easy", 3, seed=1),
        *load_benchmark("winogrande", 2, seed=1),  # partial evaluation: one context per choice
        MCItem("", ("hello there", "x"), 0),  # empty context: BOS/EOS prefix
        MCItem("Say ", ("a", "bb"), 1),  # trailing space moves into the continuation
        MCItem("Q: 1+1\nA:", ("2", "3", "4"), 0, delimiter=""),
        # choices sharing token prefixes (one a prefix of the others) share tree nodes
        MCItem("We walked to", ("the old stone house", "the old stone bridge", "the old", "a"), 0),
    ]
    one_by_one = loglikelihoods(model, tok, items, batch_size=1)
    batched = loglikelihoods(model, tok, items, batch_size=4)
    unshared = loglikelihoods(
        model, tok, items, batch_size=4, tree_attention=False
    )  # flash-attention fallback
    for item, a, b, c in zip(items, one_by_one, batched, unshared):
        assert a == pytest.approx(b, abs=1e-4)
        assert c == pytest.approx(b, abs=1e-4)
        with torch.no_grad():
            ref = []
            for context, continuation in item.requests():
                ctx, cont = encode_pair(tok, context, continuation)
                logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
                ref.append(sum(logp[len(ctx) - 1 + t, x].item() for t, x in enumerate(cont)))
        assert b == pytest.approx(ref, abs=1e-4)


def test_encode_pair_follows_the_harness(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "yes")  # trailing space moved to the continuation
    assert tok.decode(ctx) == "Answer:"
    assert tok.decode(cont) == " yes"
    ctx, _ = encode_pair(tok, "", "yes")
    assert ctx == [tok.bos_token_id]


def test_acc_norm_divides_by_choice_length_in_characters(tiny):
    model, tok = tiny
    prompt = "Question: Which is it?\nAnswer:"
    choices = ("a", "the old stone house by the river where the children sing")
    ll = [reference_loglikelihood(model, tok, prompt, " " + c) for c in choices]
    raw = max(range(2), key=ll.__getitem__)
    normed = max(range(2), key=lambda k: ll[k] / len(choices[k]))  # length without the delimiter
    assert raw != normed, "test precondition: length normalisation must change the choice"
    result = score_items(model, tok, [MCItem(prompt, choices, normed)], name="norm")
    assert result.correct == [0] and result.correct_norm == [1]
    assert result.metrics()["norm/acc_norm"] == 1.0
    assert MCItem(prompt, choices, 0).norm_lengths() == [1, len(choices[1])]
    wino = MCItem("The cat sat on ", ("Tom", "Jerry"), 0, suffix="the mat.")
    assert wino.requests() == [("The cat sat on Tom", " the mat."), ("The cat sat on Jerry", " the mat.")]
    assert wino.norm_lengths() == [8, 8]


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    model, tok = tiny
    model.model.norm.weight.data.zero_()  # final hidden state 0 -> all logits 0 -> uniform distribution
    texts = ["The river ran past the old stone house.", "Children sang in the cold night by the fire."]
    result = text_metrics(model, tok, texts, max_tokens=64)
    vocab = model.config.vocab_size
    assert result.ppl == pytest.approx(vocab, rel=1e-5)
    assert result.n_bytes == sum(len(t.encode()) for t in texts)  # whole passages fit in 64 tokens
    assert result.bpb == pytest.approx(result.n_tokens * math.log2(vocab) / result.n_bytes, rel=1e-5)
    truncated = text_metrics(model, tok, texts, max_tokens=4)
    assert truncated.n_tokens == 8 and truncated.n_bytes < result.n_bytes
    assert truncated.ppl == pytest.approx(vocab, rel=1e-5)


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _train_step(peft_model, tok, text: str) -> None:
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tok(text)["input_ids"]])
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    peft_model.eval()


TINY_CFG = dict(
    benchmarks=["arc_easy", "boolq"],
    n_per_benchmark=4,
    n_text=3,
    max_text_tokens=24,
    n_questions=3,
    max_new_tokens=6,
    n_task=4,
    batch_size=4,
    task="builtin:vornish",
)


def test_drift_is_zero_with_fresh_adapter_and_positive_after_a_step(tiny):
    model, tok = tiny
    pm = _lora(model)
    cfg = EvalConfig(**TINY_CFG)
    before = evaluate_model_pair(pm, tok, cfg, progress=False)
    for key in ("drift/wiki", "drift/books", "drift/chat", "drift/task"):
        assert before["adapted"][key] == pytest.approx(0.0, abs=1e-7)
    assert before["adapted"]["leak"] == 0.0  # the base model's own answers cannot leak
    assert all(abs(v) < 1e-6 for k, v in before["delta"].items() if not k.endswith("_stderr"))
    assert before["base"]["ppl/wiki"] == pytest.approx(before["adapted"]["ppl/wiki"], rel=1e-6)

    _train_step(pm, tok, "Translate into Vornish: water stone\nvaer kith " * 4)
    after = evaluate_model_pair(pm, tok, cfg, progress=False)
    for key in ("drift/wiki", "drift/books", "drift/chat", "drift/task"):
        assert after["adapted"][key] > 1e-6
    # the base column is unaffected by training the adapter
    assert after["base"]["ppl/wiki"] == pytest.approx(before["base"]["ppl/wiki"], rel=1e-6)
    assert after["base"]["arc_easy/acc"] == before["base"]["arc_easy/acc"]
    assert after["delta"]["ppl/wiki"] == pytest.approx(
        after["adapted"]["ppl/wiki"] - after["base"]["ppl/wiki"]
    )
    assert {"arc_easy/acc", "arc_easy/acc_stderr", "task/exact_match", "task/loss"} <= set(after["delta"])
    assert len(after["examples"]) == 3 and {"question", "base", "adapted", "leaked"} <= set(
        after["examples"][0]
    )
    assert after["timing"]["adapted"]["arc_easy/items_per_s"] > 0


def test_shared_prefix_runs_once_with_the_same_scores(tiny):
    """Sequences that share a prompt prefix score the same whether the prefix runs with every batch or once
    (its keys and values reused): NLL, base NLL, KL and greedy misses, over batches of unequal lengths."""
    from arrtune.evaluation.text import shared_prefix_length

    model, tok = tiny
    pm = _lora(model)
    _train_step(pm, tok, "Translate into Vornish: water stone\nvaer kith " * 4)
    prefix = tok("You are a helpful assistant. Answer briefly.\nQuestion:", add_special_tokens=False)[
        "input_ids"
    ]
    tails = ["water stone", "the old stone house by the river", "fire", "bread and fire and water again"]
    sequences = [prefix + tok(f" {t}\nAnswer: {t}", add_special_tokens=False)["input_ids"] for t in tails]
    starts = [len(prefix) + 3 + k for k in range(len(tails))]
    assert shared_prefix_length(sequences, starts) == len(prefix)  # every row shares it: the cache is used
    assert shared_prefix_length(sequences, [len(prefix) - 2] * 4) == len(prefix) - 3  # stops before scoring
    assert shared_prefix_length(sequences, [4] * 4) == 0  # too short to be worth a cache

    def stats(share: bool):
        return score_sequences(pm, tok, sequences, starts, batch_size=3, share_prefix=share,
                               base_context=lambda: pm.disable_adapter())  # fmt: skip

    shared, unshared = stats(True), stats(False)
    assert sum(unshared.kl) > 1e-4
    for field in ("nll", "nll_base", "kl"):
        assert getattr(shared, field) == pytest.approx(getattr(unshared, field), rel=1e-4, abs=1e-6), field
    assert shared.argmax_misses == unshared.argmax_misses


def _assert_same_result(got, want, where="result"):
    """Same structure (keys, lengths, types) and values up to float noise; timings: keys only."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            if where.startswith("result.timing") and not isinstance(want[key], dict):
                continue
            _assert_same_result(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want)):
            _assert_same_result(a, b, f"{where}[{k}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7, nan_ok=True), where
    else:
        assert got == want, where


def test_pair_with_cached_base_result_equals_uncached(tiny_model_dir, tmp_path, monkeypatch):
    from arrtune.evaluation import measurements

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = EvalConfig(**TINY_CFG)
    base = evaluate_single(load_model(str(tiny_model_dir)), tok, cfg, progress=False)
    cache = base["base_cache"]
    assert set(cache["per_item"]) == {
        "arc_easy/acc",
        "arc_easy/acc_norm",
        "boolq/acc",
        "boolq/acc_norm",
        "task/exact_match",
    }
    assert len(cache["per_item"]["arc_easy/acc"]) == 4 and len(cache["task"]["answers"]) == 4
    assert len(cache["chat"]["questions"]) == 3 and len(cache["chat"]["answer_ids"]) == 3
    assert cache["metrics"]["task/loss"] == base["model"]["task/loss"] and "ppl/wiki" not in cache["metrics"]
    loaded = json.loads(write_eval_json(base, tmp_path / "base_eval.json").read_text())

    # an adapter as `arrtune compare` loads it: saved, then PeftModel.from_pretrained on a fresh base model
    trained = _lora(load_model(str(tiny_model_dir)))
    _train_step(trained, tok, "Translate into Vornish: water stone\nvaer kith " * 4)
    trained.save_pretrained(tmp_path / "adapter")
    pm = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), tmp_path / "adapter")

    calls = {"score_items": 0, "answer": 0}
    for name in calls:
        original = getattr(measurements, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(measurements, name, counted)
    uncached = evaluate_model_pair(pm, tok, cfg, progress=False)
    assert calls == {"score_items": 4, "answer": 4}  # 2 benchmarks x 2 models; task + questions x 2 models
    assert uncached["adapted"]["drift/wiki"] > 1e-6
    for base_result in (loaded, base):  # read back from JSON, or as returned
        calls.update(score_items=0, answer=0)
        cached = evaluate_model_pair(pm, tok, cfg, progress=False, base_result=base_result)
        assert calls == {"score_items": 2, "answer": 2}  # the adapted model's only
        _assert_same_result(cached, uncached)
    assert cached["timing"]["base"] == base["timing"]["model"]

    # the base's hidden states on the held-out text, kept across adapters (arrtune compare): the first call fills
    # them, the next uses them (a second adapter on a fresh copy of the base) with the same result
    base_hidden: dict = {}
    first = evaluate_model_pair(pm, tok, cfg, progress=False, base_result=base, base_hidden=base_hidden)
    _assert_same_result(first, uncached)
    assert len(base_hidden) == 2 and all(base_hidden.values())  # wiki and books
    pm2 = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), tmp_path / "adapter")
    second = evaluate_model_pair(pm2, tok, cfg, progress=False, base_result=base, base_hidden=base_hidden)
    _assert_same_result(second, uncached)
    for batches in base_hidden.values():  # it is used: altered hidden states change the drift
        batches[:] = [hidden * 0.5 for hidden in batches]
    altered = evaluate_model_pair(pm2, tok, cfg, progress=False, base_result=base, base_hidden=base_hidden)
    assert altered["adapted"]["drift/wiki"] != pytest.approx(uncached["adapted"]["drift/wiki"])


def test_pair_rejects_a_base_result_of_another_config(tiny):
    model, tok = tiny
    pm = _lora(model)
    cfg = EvalConfig(**TINY_CFG)
    other = {"mode": "single", "config": asdict(EvalConfig(**{**TINY_CFG, "seed": 1})), "base_cache": {}}
    with pytest.raises(ValueError, match=r"different EvalConfig \(seed: 1 != 0\)"):
        evaluate_model_pair(pm, tok, cfg, progress=False, base_result=other)
    with pytest.raises(ValueError, match="result of evaluate_single"):
        evaluate_model_pair(pm, tok, cfg, progress=False, base_result={"config": asdict(cfg)})


def test_evaluate_single_schema_table_and_json(tiny, tmp_path):
    model, tok = tiny
    result = evaluate_single(model, tok, EvalConfig(**TINY_CFG), progress=False)
    m = result["model"]
    for key in (
        "arc_easy/acc",
        "arc_easy/acc_stderr",
        "arc_easy/acc_norm",
        "boolq/acc",
        "mc/mean_acc",
        "ppl/wiki",
        "bpb/wiki",
        "ppl/books",
        "bpb/books",
        "task/exact_match",
        "task/exact_match_stderr",
        "task/loss",
    ):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert "drift/wiki" not in m and "leak" not in m
    table = format_table(result)
    assert "arc_easy/acc" in table and "±" in table and "items/s" in table
    result["model"]["weird"] = float("nan")
    path = write_eval_json(result, tmp_path / "out" / "eval.json")
    loaded = json.loads(path.read_text())
    assert loaded["model"]["weird"] is None and loaded["model"]["ppl/wiki"] == m["ppl/wiki"]
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left behind


def test_results_are_deterministic(tiny):
    model, tok = tiny
    cfg = EvalConfig(**{**TINY_CFG, "n_text": 0})
    a = evaluate_single(model, tok, cfg, progress=False)
    b = evaluate_single(model, tok, cfg, progress=False)
    assert a["model"] == b["model"] and a["task_examples"] == b["task_examples"]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batched_generation_matches_one_by_one(tiny, cache):
    """Batched greedy answers equal one-by-one answers, with transformers' dynamic cache and with a static one
    (the kind ``generate`` uses on CUDA), so left padding is handled by both."""
    model, tok = tiny
    with torch.no_grad():  # sharpen the random model so that its greedy answers depend on the prompt
        for name, param in model.named_parameters():
            if "proj" in name:
                param.mul_(8)
    prompts = [
        question_prompt_ids(tok, q) for q in ("Hi", "What breed of dog was Lassie, the film star?", "Why?")
    ]
    batched = generate(model, tok, prompts, max_new_tokens=5, batch_size=3, cache=cache)
    assert len({tuple(a) for a in batched}) == 3  # answers differ, so padding mistakes would show
    assert batched == generate(model, tok, prompts, max_new_tokens=5, batch_size=1, cache="dynamic")


def test_task_response_tokens_match_training_labels(tiny):
    from arrtune.data.sft import tokenize_messages

    _, tok = tiny
    messages = [
        {"role": "user", "content": "Translate into Vornish: water stone"},
        {"role": "assistant", "content": "vaer kith"},
    ]
    ex = task_example(tok, messages)
    ids, labels = tokenize_messages(tok, messages)
    assert ex.prompt_ids + ex.response_ids == ids
    assert ex.response_ids == [t for t in labels if t != -100]
    assert ex.reference == "vaer kith" and ex.prompt == messages[0]["content"]


def test_leak_words():
    vocab = leak_vocabulary(["vaer kith", "Kith dorn water"], ["The water is cold"], {"stone"})
    assert vocab == {"vaer", "kith", "dorn"}
    assert leaked_words("Kith! I like water.", vocab) == ["kith"]
    assert leaked_words("The river, 2 stones.", vocab) == []


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_packaged_benchmark_loaders_return_the_documented_schema(name):
    items = load_benchmark(name, n=5, seed=0)
    assert len(items) == 5
    for item in items:
        assert isinstance(item, MCItem)
        assert isinstance(item.prompt, str) and item.prompt
        assert len(item.choices) >= 2 and all(isinstance(c, str) and c for c in item.choices)
        assert isinstance(item.label, int) and 0 <= item.label < len(item.choices)
        assert item.delimiter == " "
    assert load_benchmark(name, n=5, seed=0) == items  # fixed-seed subset
    assert load_benchmark(name, n=5, seed=1) != items
    first = items[0]
    if name.startswith("arc") or name == "piqa":
        assert first.prompt.startswith("Question: ") and first.prompt.endswith("\nAnswer:")
    if name == "boolq":
        assert first.choices == ("no", "yes") and first.prompt.endswith("?\nAnswer:")
    if name == "mmlu":
        assert first.choices == ("A", "B", "C", "D")
        assert first.prompt.startswith("The following are multiple choice questions (with answers) about ")
        assert "\nA. " in first.prompt and first.prompt.endswith("\nAnswer:")
    if name == "winogrande":
        assert first.suffix and "_" not in first.prompt
    if name == "sciq":
        assert all(i.label == 3 for i in items)
    if name == "hellaswag":
        assert all("[" not in c for i in items for c in i.choices)


def test_mmlu_subject_and_unknown_benchmark():
    items = load_benchmark("mmlu:anatomy", n=3)
    assert "about anatomy." in items[0].prompt
    with pytest.raises(ArrtuneError, match="unknown benchmark"):
        load_benchmark("nope")


def test_user_jsonl_benchmark(tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(
        '{"prompt": "Q: 2+2=\\nA:", "choices": ["3", "4"], "label": 1}\n\n'
        '{"prompt": "Sky is", "choices": ["blue", "red", "green"], "label": 0, "delimiter": " "}\n'
    )
    items = load_benchmark(str(good))
    assert items == [MCItem("Q: 2+2=\nA:", ("3", "4"), 1), MCItem("Sky is", ("blue", "red", "green"), 0)]
    for line, message in (
        ('{"prompt": "x", "choices": ["a"], "label": 0}', "choices"),
        ('{"prompt": "x", "choices": ["a", "b"], "label": 2}', "label"),
        ('{"prompt": 3, "choices": ["a", "b"], "label": 0}', "prompt"),
        ('{"prompt": "x", "choices": ["a", "b"], "label": 0, "answer": 1}', "unknown field"),
        ("{not json", "invalid JSON"),
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "ok", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
        with pytest.raises(ArrtuneError, match=rf"bad\.jsonl:2: .*{message}"):
            load_jsonl_benchmark(bad)


def test_eval_config_from_dict():
    cfg = EvalConfig.from_dict({"benchmarks": "piqa", "n_per_benchmark": 10, "task": None})
    assert cfg.benchmarks == ["piqa"] and cfg.n_per_benchmark == 10 and cfg.task is None
    with pytest.raises(ArrtuneError, match="unknown key 'n_items'"):
        EvalConfig.from_dict({"n_items": 3}, source="eval.yaml")
    with pytest.raises(ArrtuneError, match="eval.yaml: field 'batch_size' must be >= 1"):
        EvalConfig.from_dict({"batch_size": 0}, source="eval.yaml")


def test_task_train_rows_may_have_empty_responses_but_held_out_rows_may_not(tmp_path) -> None:
    """Training data with an empty response trains (the row is dropped and counted), so it is a valid
    ``task_train``; a held-out row without a response cannot be scored."""
    import json

    from arrtune.errors import ArrtuneError
    from arrtune.evaluation import EvalConfig, check_eval_inputs

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": " "}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(rows[0]) + "\n")
    check_eval_inputs(EvalConfig(benchmarks=[], task=str(good), task_train=str(path)))
    with pytest.raises(ArrtuneError, match="rows.jsonl:2: empty response"):
        check_eval_inputs(EvalConfig(benchmarks=[], task=str(path)))
