"""Several adapters on one base in the torch engine: per-request switching gives what each adapter gives
alone, adapter None the plain base; unknown names are refused; open_engine opens adapter folders."""

from __future__ import annotations

import pytest

from slmops.engines import BASE_ADAPTER, GenerationRequest, open_engine
from slmops.engines.torch_engine import TorchEngine
from slmops.errors import BadInputError

from .conftest import make_lora

PROMPTS = ["Where is my order ORD-12345?", "Cancel it", "My yoga mat arrived broken. Order #998877."]


def _reqs(adapter=None, n_new=12):
    return [GenerationRequest(prompt=p, max_new_tokens=n_new, adapter=adapter) for p in PROMPTS]


def _ids(results):
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def alone(tiny_model_dir, lora_dirs):
    """Greedy token ids from the plain base and from each adapter loaded alone (its own engine)."""
    out = {None: _ids(TorchEngine(tiny_model_dir).generate(_reqs()))}
    for name, folder in lora_dirs.items():
        eng = TorchEngine(tiny_model_dir, adapters={name: str(folder)}, default_adapter=name)
        out[name] = _ids(eng.generate(_reqs()))
    return out


@pytest.fixture(scope="module")
def multi(tiny_model_dir, lora_dirs):
    return TorchEngine(tiny_model_dir, adapters={k: str(v) for k, v in lora_dirs.items()})


def test_adapters_change_outputs(alone):
    assert alone["a"] != alone[None] and alone["b"] != alone[None] and alone["a"] != alone["b"]


def test_switching_in_one_batch_equals_each_adapter_alone(multi, alone):
    assert multi.adapters == ["a", "b"] and multi.default_adapter is None
    # interleaved requests for a, b and the base in a single generate call
    mixed = [GenerationRequest(prompt=p, max_new_tokens=12, adapter=name)
             for p in PROMPTS for name in ("a", None, "b", BASE_ADAPTER)]
    got = _ids(multi.generate(mixed))
    for k, p in enumerate(PROMPTS):
        a, base, b, base2 = got[4 * k:4 * k + 4]
        assert a == alone["a"][k] and b == alone["b"][k], p
        assert base == alone[None][k] and base2 == alone[None][k], p
    # again, in another order: no state leaks from one call to the next
    assert _ids(multi.generate(_reqs("b"))) == alone["b"]
    assert _ids(multi.generate(_reqs())) == alone[None]
    assert _ids(multi.generate(_reqs("a"))) == alone["a"]


def test_stream_and_logprobs_follow_the_adapter(multi, alone):
    for name in ("a", "b", None):
        req = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=12, adapter=name)
        streamed = [e.token_id for e in multi.stream(req) if e.token_id is not None and e.finish_reason != "stop"]
        assert streamed[: len(alone[name][0])] == alone[name][0]
    # two streams interleaved step by step, on different adapters
    sa = multi.stream(GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, adapter="a"))
    sb = multi.stream(GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, adapter="b"))
    ta, tb = [], []
    for ea, eb in zip(sa, sb, strict=False):
        ta.append(ea.token_id)
        tb.append(eb.token_id)
    n = min(len(ta), len(tb))
    assert ta[:n] == alone["a"][1][:n] and tb[:n] == alone["b"][1][:n]
    lp_a, lp_base = multi.logprobs([PROMPTS[2]], adapter="a")[0], multi.logprobs([PROMPTS[2]])[0]
    assert lp_a.logprobs[1:] != lp_base.logprobs[1:]


def test_unknown_adapter_is_refused_listing_the_loaded_ones(multi):
    with pytest.raises(BadInputError, match=r"no adapter named 'c' is loaded \(loaded: a, b\)"):
        multi.generate([GenerationRequest(prompt="hi", adapter="c")])
    with pytest.raises(BadInputError, match="loaded: none"):
        TorchEngine(multi.path).generate([GenerationRequest(prompt="hi", adapter="a")])
    with pytest.raises(BadInputError):
        GenerationRequest(prompt="hi", adapter="")


def test_load_and_unload(tiny_model_dir, lora_dirs, alone, tmp_path):
    eng = TorchEngine(tiny_model_dir)
    base_params = eng.info().parameters
    eng.load_adapter("x", str(lora_dirs["a"]))
    with pytest.raises(BadInputError, match="already loaded"):
        eng.load_adapter("x", str(lora_dirs["b"]))
    with pytest.raises(BadInputError, match="reserved"):
        eng.load_adapter(BASE_ADAPTER, str(lora_dirs["b"]))
    eng.load_adapter("y", str(lora_dirs["b"]))
    info = eng.info()
    assert info.parameters == base_params and info.extra["adapter_parameters"]["y"] > info.extra["adapter_parameters"]["x"] > 0
    assert _ids(eng.generate(_reqs("y"))) == alone["b"]
    eng.unload_adapter("y")
    assert eng.adapters == ["x"] and _ids(eng.generate(_reqs("x"))) == alone["a"]
    with pytest.raises(BadInputError, match="no adapter named 'y'"):
        eng.generate(_reqs("y"))
    eng.unload_adapter("x")
    assert eng.adapters == [] and eng._peft is None
    assert not any("lora" in n for n, _ in eng.model.named_parameters())
    assert _ids(eng.generate(_reqs())) == alone[None]


def test_a_mismatched_adapter_leaves_the_engine_as_it_was(tiny_model_dir, lora_dirs, alone, tmp_path):
    from slmops.models.presets import create_model

    eng = TorchEngine(tiny_model_dir)
    wide = create_model("tiny-llama", vocab_size=eng.model.config.vocab_size, seed=0, hidden_size=128)
    wide.save_pretrained(tmp_path / "wide")
    bad = make_lora(tmp_path / "wide", tmp_path / "bad", seed=5)
    with pytest.raises(BadInputError, match="does not fit|architecture differs"):
        eng.load_adapter("bad", str(bad))
    assert eng.adapters == [] and not any("lora" in n for n, _ in eng.model.named_parameters())
    assert _ids(eng.generate(_reqs())) == alone[None]
    eng.load_adapter("a", str(lora_dirs["a"]))
    with pytest.raises(BadInputError):
        eng.load_adapter("bad", str(bad))
    assert eng.adapters == ["a"] and _ids(eng.generate(_reqs("a"))) == alone["a"]


def test_open_engine_on_an_adapter_folder_or_artifact(lora_dirs, alone, workspace):
    eng = open_engine(lora_dirs["a"])
    assert eng.adapters == ["a"] and eng.default_adapter == "a"
    assert _ids(eng.generate(_reqs())) == alone["a"]
    assert _ids(eng.generate(_reqs(BASE_ADAPTER))) == alone[None]
    ws, ids = workspace
    eng2 = open_engine(ids["b"], workspace=ws, adapters={"a": str(lora_dirs["a"])})
    assert eng2.adapters == ["lora-b", "a"] and eng2.default_adapter == "lora-b"
    assert _ids(eng2.generate(_reqs())) == alone["b"] and _ids(eng2.generate(_reqs("a"))) == alone["a"]
    assert eng2.path == str(ws.resolve(ids["base"]))  # the base came from the adapter artifact's parent
