"""Teacher generation (library level): resume, torn last lines, duplicates on read, failures and
min-success, seeds and hashes, local torch teachers, several teachers."""

from __future__ import annotations

import json
import threading

import pytest

from slmops.distill import (
    GENERATIONS,
    GenerationFailed,
    Teacher,
    generate_synthetic,
    read_rows,
    repair_and_index,
)
from slmops.engines.base import GenerationResult
from slmops.errors import BadInputError


class FakeEngine:
    """A local engine double: answers `<name>:<last user message>`; prompts containing a word in `fail`
    raise (the whole batch fails, as a real batched engine would)."""

    def __init__(self, name: str = "fake", fail: tuple[str, ...] = (), max_batch_size: int = 4):
        self.name = name
        self.fail = fail
        self.max_batch_size = max_batch_size
        self.calls: list[list] = []

    def generate(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            if any(word in text for word in self.fail):
                raise RuntimeError(f"cannot answer {text!r}")
            answer = f"{self.name}:{text}:{r.seed % 1000 if r.temperature > 0 else 0}"
            out.append(GenerationResult(text=answer, token_ids=[], finish_reason="stop", prompt_tokens=3,
                                        completion_tokens=5, ttft_s=0.01, latency_s=0.02))
        return out

    def close(self):
        pass


def prompts(n: int, prefix: str = "question") -> list[list[dict]]:
    return [[{"role": "user", "content": f"{prefix} {i}"}] for i in range(n)]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in (path / GENERATIONS).read_text().splitlines()]


def test_generates_rows_and_resumes_without_duplicates(tmp_path):
    eng = FakeEngine()
    teacher = Teacher("fake", eng)
    rep = generate_synthetic([teacher], prompts(10), tmp_path, system_prompt="Be brief.", batch_size=4)
    assert (rep.total, rep.generated, rep.done_before, rep.failed) == (10, 10, 0, 0)
    rows = lines(tmp_path)
    assert sorted(r["index"] for r in rows) == list(range(10))
    r0 = next(r for r in rows if r["index"] == 0)
    assert r0["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "question 0"}]
    assert r0["samples"] == ["fake:question 0:0"] and r0["teacher"] == "fake" and r0["engine"] == "fake"
    assert r0["sampling"]["max_new_tokens"] == 256 and r0["usage"] == {"prompt_tokens": 3, "completion_tokens": 5}
    assert r0["timing"]["latency_s"] == [0.02] and r0["finish_reasons"] == ["stop"]
    assert [len(c) for c in eng.calls] == [4, 4, 2]  # batched by batch_size
    # rerun: nothing to do
    rep = generate_synthetic([teacher], prompts(10), tmp_path, system_prompt="Be brief.", batch_size=4)
    assert (rep.generated, rep.done_before) == (0, 10) and len(lines(tmp_path)) == 10
    # more prompts: only the new ones run
    rep = generate_synthetic([teacher], prompts(12), tmp_path, system_prompt="Be brief.", batch_size=4)
    assert (rep.generated, rep.done_before) == (2, 10) and len(lines(tmp_path)) == 12


def test_changed_settings_do_not_reuse_rows(tmp_path):
    teacher = Teacher("fake", FakeEngine())
    generate_synthetic([teacher], prompts(3), tmp_path)
    rep = generate_synthetic([teacher], prompts(3), tmp_path, max_new_tokens=32)
    assert rep.generated == 3 and rep.stale_rows == 3
    rep = generate_synthetic([teacher], prompts(3), tmp_path, system_prompt="New system prompt")
    assert rep.generated == 3 and rep.stale_rows == 6
    rep = generate_synthetic([Teacher("other-name", FakeEngine())], prompts(3), tmp_path)
    assert rep.generated == 3
    # a prompt with its own system message ignores --system-prompt, so its hash does not change
    own = [[{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]]
    generate_synthetic([teacher], own, tmp_path / "b")
    assert generate_synthetic([teacher], own, tmp_path / "b", system_prompt="Other").generated == 0


def test_torn_last_line_is_cut_and_redone(tmp_path):
    teacher = Teacher("fake", FakeEngine())
    generate_synthetic([teacher], prompts(5), tmp_path)
    path = tmp_path / GENERATIONS
    data = path.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    path.write_bytes(data[: last + 25])  # a kill in the middle of writing the last row
    torn_hash = json.loads(data[last:])["prompt_hash"]
    rep = generate_synthetic([teacher], prompts(5), tmp_path)
    assert rep.repair.torn_last_line and rep.generated == 1 and rep.done_before == 4
    rows = lines(tmp_path)  # every line parses again
    assert len(rows) == 5 and rows[-1]["prompt_hash"] == torn_hash
    assert sorted(r["index"] for r in rows) == list(range(5))


def test_duplicate_and_bad_lines_are_dropped_on_read(tmp_path):
    teacher = Teacher("fake", FakeEngine())
    generate_synthetic([teacher], prompts(4), tmp_path)
    path = tmp_path / GENERATIONS
    text = path.read_text().splitlines(keepends=True)
    path.write_text(text[0] + text[1] + text[0] + "not json\n" + '{"valid json": "but no row"}\n' + text[2] + text[3])
    hashes, repair = repair_and_index(path)
    assert len(hashes) == 4 and repair.duplicate_lines == 1 and repair.bad_lines == 2
    assert len(lines(tmp_path)) == 4  # rewritten without them
    assert generate_synthetic([teacher], prompts(4), tmp_path).generated == 0
    # read_rows also dedupes on its own (e.g. a file copied by hand)
    path.write_text(text[0] + text[0] + text[1])
    assert len(read_rows(path)) == 2


def test_min_success_failure_groups_errors_and_keeps_successes(tmp_path):
    eng = FakeEngine(fail=("question 1", "question 3", "question 5"))
    teacher = Teacher("flaky", eng)
    with pytest.raises(GenerationFailed) as err:
        generate_synthetic([teacher], prompts(8), tmp_path, batch_size=4, min_success=0.9)
    msg = str(err.value)
    assert "3 of 8 prompt generations failed (5 succeeded, 62% < --min-success 90%)" in msg
    assert "1 x flaky: RuntimeError: cannot answer 'question 1'" in msg
    assert err.value.exit_code == 1 and "rerun the same command" in err.value.hint
    assert sorted(r["index"] for r in lines(tmp_path)) == [0, 2, 4, 6, 7]  # the rest of each batch kept
    failures = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["index"] for f in failures) == [1, 3, 5] and failures[0]["teacher"] == "flaky"
    # the same errors grouped: identical messages count together
    with pytest.raises(GenerationFailed, match="4 x other: RuntimeError: model is on fire"):
        generate_synthetic([Teacher("other", _Broken())], prompts(4), tmp_path / "b")
    # below the bar but allowed
    eng.fail = ("question 1",)
    rep = generate_synthetic([teacher], prompts(8), tmp_path, min_success=0.8)
    assert rep.ok and rep.generated == 2 and rep.failed == 1
    eng.fail = ()
    rep = generate_synthetic([teacher], prompts(8), tmp_path)
    assert rep.generated == 1 and rep.succeeded == 8


class _Broken(FakeEngine):
    def generate(self, requests):
        raise RuntimeError("model is on fire")


def test_num_samples_and_seeds_are_reproducible(tmp_path):
    teacher = Teacher("fake", FakeEngine())
    generate_synthetic([teacher], prompts(3), tmp_path / "a", num_samples=3, temperature=0.8, seed=7)
    generate_synthetic([teacher], prompts(3), tmp_path / "b", num_samples=3, temperature=0.8, seed=7)
    generate_synthetic([teacher], prompts(3), tmp_path / "c", num_samples=3, temperature=0.8, seed=8)
    a, b, c = (sorted(lines(tmp_path / x), key=lambda r: r["index"]) for x in "abc")
    assert [r["seeds"] for r in a] == [r["seeds"] for r in b] != [r["seeds"] for r in c]
    assert all(len(set(r["seeds"])) == 3 and len(r["samples"]) == 3 for r in a)
    assert [r["samples"] for r in a] == [r["samples"] for r in b]


def test_duplicate_prompts_are_generated_once(tmp_path):
    ps = prompts(3) + prompts(2)
    rep = generate_synthetic([Teacher("fake", FakeEngine())], ps, tmp_path)
    assert rep.prompts == 3 and rep.duplicate_prompts == 2 and rep.total == 3 and len(lines(tmp_path)) == 3


def test_several_teachers_each_answer_every_prompt(tmp_path):
    teachers = [Teacher("a", FakeEngine("a")), Teacher("b", FakeEngine("b", fail=("question 2",)))]
    rep = generate_synthetic(teachers, prompts(4), tmp_path, min_success=0.5)
    assert rep.total == 8 and rep.failed == 1 and rep.teachers == ["a", "b"]
    rows = lines(tmp_path)
    assert sorted((r["teacher"], r["index"]) for r in rows) == [
        ("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1), ("b", 3)]
    by = {(r["teacher"], r["index"]): r for r in rows}
    assert by["a", 0]["messages_hash"] == by["b", 0]["messages_hash"]
    assert by["a", 0]["prompt_hash"] != by["b", 0]["prompt_hash"]
    with pytest.raises(BadInputError, match="same teacher is given twice"):
        generate_synthetic([teachers[0], teachers[0]], prompts(1), tmp_path)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    started, release = threading.Event(), threading.Event()

    class Slow(FakeEngine):
        def generate(self, requests):
            started.set()
            release.wait(10)
            return super().generate(requests)

    t = threading.Thread(target=generate_synthetic, args=([Teacher("slow", Slow())], prompts(1), tmp_path))
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(BadInputError, match="another run is writing"):
            generate_synthetic([Teacher("fake", FakeEngine())], prompts(1), tmp_path)
    finally:
        release.set()
        t.join()


def test_bad_arguments():
    t = Teacher("fake", FakeEngine())
    with pytest.raises(BadInputError, match="no teacher"):
        generate_synthetic([], prompts(1), "x")
    with pytest.raises(BadInputError, match="num_samples"):
        generate_synthetic([t], prompts(1), "x", num_samples=0)
    with pytest.raises(BadInputError, match="temperature"):
        generate_synthetic([t], prompts(1), "x", temperature=-1)


def test_local_torch_teacher_batched(tmp_path, tiny_model_dir):
    from slmops.distill import open_teacher

    teacher = open_teacher(str(tiny_model_dir), max_batch_size=4)
    assert teacher.name == str(tiny_model_dir.resolve()) and teacher.engine.name == "torch"
    rep = generate_synthetic([teacher], prompts(6, "Where is order"), tmp_path, max_new_tokens=6,
                             num_samples=2, temperature=1.0, batch_size=4)
    assert rep.generated == 6
    rows = sorted(lines(tmp_path), key=lambda r: r["index"])
    assert all(len(r["samples"]) == 2 and r["usage"]["completion_tokens"] <= 12 for r in rows)
    # seeded sampling: a rerun elsewhere gives the same samples
    generate_synthetic([teacher], prompts(6, "Where is order"), tmp_path / "again", max_new_tokens=6,
                       num_samples=2, temperature=1.0, batch_size=3)
    again = sorted(lines(tmp_path / "again"), key=lambda r: r["index"])
    assert [r["samples"] for r in rows] == [r["samples"] for r in again]
