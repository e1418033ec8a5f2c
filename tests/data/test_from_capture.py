"""`slmops data from-capture`: captured traffic -> a redacted, de-duplicated prompt file with a drift summary."""

from __future__ import annotations

import json
import random

import pytest

from slmops.cli.app import run
from slmops.data import load_dataset_file
from slmops.data.capture import TrainingIndex, drift_path_for, drift_summary, prompts_from_capture
from slmops.distill.filters import jaccard, shingles
from slmops.errors import BadInputError, NotFoundError

SYSTEM = {"role": "system", "content": "You are helpful."}
TRAIN = ["What is the capital of France?", "Translate 'good morning' into Spanish.",
         "Summarize the plot of Hamlet in one sentence."]
PII_1 = "Email me at jane.doe@example.com or call +1 415 555 0100 about my order 1234567890."
PII_2 = "Email me at bob@corp.io or call +44 20 7946 0958 about my order 9876543210."
HAIKU = "Write a haiku about Kubernetes autoscaling."


def _chat(user: str, answer: str = "ok", model: str = "student") -> str:
    return json.dumps({"messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                       "metadata": {"model": model, "created": 1, "id": "chatcmpl-1"}})


@pytest.fixture()
def files(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t},
                                                      {"role": "assistant", "content": "a"}]}) + "\n"
                             for t in TRAIN))
    capture = tmp_path / "capture.jsonl"
    lines = [
        _chat("What is the capital of France?", "Paris"),                       # 1 like training
        _chat("what is the   capital of FRANCE?", "Paris."),                    # 2 exact duplicate of 1
        json.dumps({"prompt": "Translate 'good morning' into Spanish.", "completion": "Buenos dias",
                    "metadata": {"model": "other", "created": 2, "id": "cmpl-1"}}),  # 3 completion record
        _chat(PII_1),                                                           # 4 PII, unlike training
        _chat(HAIKU),                                                           # 5 unlike training
        _chat(HAIKU[:-1] + "!!"),                                               # 6 near duplicate of 5
        '{"messages": [{"role": "user", "con',                                  # 7 torn line
        json.dumps({"foo": 1}),                                                 # 8 neither shape
        json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),     # 9 no user turn
        _chat(PII_2),                                                           # 10 same as 4 once redacted
    ]
    capture.write_text("\n".join(lines) + "\n")
    return {"train": train, "capture": capture}


def test_dedup_redaction_and_drift_numbers(files, tmp_path):
    out = tmp_path / "next" / "prompts.jsonl"
    res = prompts_from_capture([files["capture"]], out, train=files["train"])
    assert res.records == 10
    assert res.skipped == {"invalid-prompt": 1, "malformed": 1, "unknown-shape": 1}
    assert res.redaction == "pii" and res.redacted == 2
    assert res.exact_duplicates == 2 and res.near_duplicates == 1 and res.written == 4
    d = res.drift
    assert d.captured == 5 and d.requests == 7 and d.training_prompts == 3 and d.min_similarity == 0.3
    assert d.unlike == 3 and d.share_unlike == 0.6
    assert d.unlike_requests == 4 and d.share_unlike_requests == round(4 / 7, 4)
    assert d.similarity["max"] == 1.0 and d.similarity["min"] < 0.2
    assert [e["similarity"] < 0.3 for e in d.examples] == [True] * 3
    assert any("[EMAIL]" in e["prompt"] for e in d.examples)

    # the file is exactly what `distill generate --prompts` reads
    prompts = load_dataset_file(out, purpose="prompts").prompts()
    assert prompts == [
        [SYSTEM, {"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
        [SYSTEM, {"role": "user", "content": "Email me at [EMAIL] or call [NUMBER] about my order [NUMBER]."}],
        [SYSTEM, {"role": "user", "content": HAIKU}],
    ]
    text = out.read_text()
    for secret in ("jane.doe", "example.com", "415", "bob@corp.io", "7946", "Paris", "Buenos"):
        assert secret not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["metadata"]["requests"] for r in rows] == [2, 1, 2, 2]
    assert rows[0]["metadata"]["source"].endswith("capture.jsonl:1")
    assert rows[0]["metadata"]["train_similarity"] == 1.0

    saved = json.loads(drift_path_for(out).read_text())
    assert drift_path_for(out).name == "prompts.jsonl.drift.json"
    assert saved["drift"]["share_unlike"] == 0.6 and saved["written"] == 4 and "Jaccard" in saved["drift"]["measure"]
    assert "jane.doe" not in drift_path_for(out).read_text()


def test_without_redaction_or_near_dups_and_model_filter(files, tmp_path):
    out = tmp_path / "p.jsonl"
    res = prompts_from_capture([files["capture"]], out, redact="none", near_dup_threshold=0)
    assert res.redacted == 0 and res.exact_duplicates == 1 and res.near_duplicates == 0 and res.written == 6
    assert "jane.doe@example.com" in out.read_text() and res.drift is None
    assert json.loads(drift_path_for(out).read_text())["drift"] is None
    res = prompts_from_capture([files["capture"]], out, model="other")
    assert res.written == 1 and res.skipped["other-model"] == 8


def test_custom_redaction_hook(files, tmp_path, monkeypatch):
    (tmp_path / "myhooks.py").write_text(
        "def scrub(record):\n"
        "    text = json.dumps(record)\n"
        "    return None if 'haiku' in text else record\n"
        "import json\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = prompts_from_capture([files["capture"]], tmp_path / "p.jsonl", redact="myhooks:scrub")
    assert res.skipped["dropped-by-redactor"] == 2 and res.written == 4
    with pytest.raises(BadInputError, match="--redact"):
        prompts_from_capture([files["capture"]], tmp_path / "p.jsonl", redact="nocolon")


def test_bad_inputs(files, tmp_path):
    with pytest.raises(NotFoundError):
        prompts_from_capture([tmp_path / "missing.jsonl"], tmp_path / "p.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"foo": 1}\n')
    with pytest.raises(BadInputError, match="no prompts"):
        prompts_from_capture([empty], tmp_path / "p.jsonl")
    with pytest.raises(BadInputError, match="min-similarity"):
        prompts_from_capture([files["capture"]], tmp_path / "p.jsonl", min_similarity=1.5)


def test_drift_measure_is_exact_jaccard():
    # "abcdefg" vs "abcdefh": 5-grams {abcde, bcdef, cdefg} vs {abcde, bcdef, cdefh} -> 2/4
    summary, sims = drift_summary(["abcdefg", "zzzzzzzz"], ["abcdefh"], 0.5)
    assert sims == [0.5, 0.0] and summary.unlike == 1 and summary.share_unlike == 0.5
    # the inverted index agrees with brute force
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "refund", "order", "late", "the", "my", "is"]
    train = [" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(60)]
    queries = [" ".join(rng.choices(words, k=rng.randint(2, 8))) for _ in range(30)]
    index = TrainingIndex(train)
    for q in queries:
        best = max(jaccard(shingles(q), shingles(t)) for t in train)
        assert index.nearest(q)[0] == pytest.approx(best)


def test_cli_from_capture(files, tmp_path, capsys):
    out = tmp_path / "prompts.jsonl"
    rc = run(["data", "from-capture", str(files["capture"]), "--out", str(out), "--train", str(files["train"])])
    assert rc == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert "3 of 5 distinct captured prompts (60.0%" in printed and "[EMAIL]" in printed
    assert "prompts.jsonl.drift.json" in printed
    assert run(["data", "from-capture", str(files["capture"]), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 4
    assert run(["data", "from-capture", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert run(["data", "from-capture", str(files["capture"]), "--out", str(out), "--redact", "x"]) == 2


def test_default_threshold_calibration_on_the_demo_task():
    """The default --min-similarity flags almost none of the training distribution and most of a new intent."""
    from slmops.data.capture import DEFAULT_MIN_SIMILARITY, comparison_text
    from slmops.data.formats import prompt_part
    from slmops.demo import task

    def texts(examples):
        return [comparison_text(prompt_part(task.to_chat_row(e)["messages"])) for e in examples]

    index = TrainingIndex(texts(task.generate(2000, 1)))
    same, _ = drift_summary(texts(task.generate(300, 7)), index, DEFAULT_MIN_SIMILARITY)
    new, _ = drift_summary(texts(task.generate_extension("gifts", 300, 3)), index, DEFAULT_MIN_SIMILARITY)
    assert same.share_unlike < 0.02 and new.share_unlike > 0.9
