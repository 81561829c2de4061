"""Tenant isolation in the engine: no request's parameters, delta files or failures may end or
starve another tenant's requests (issue 18's engine items, each a case that failed before)."""

from __future__ import annotations

import shutil
import socket

import pytest
import torch
from test_engine import GREEDY, PROMPTS, generated, make_engine, token_ids

from bitdelta.engine import SamplingParams
from bitdelta.engine.sampling import sample
from bitdelta.errors import DeltaFormatError


def test_sampling_is_defined_for_every_accepted_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1000) * 8
    best = int(torch.argmax(logits))
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-39, 1e-300, 5e-324, 1e-6):
        assert sample(logits, SamplingParams(4, temperature=temperature), generator) == best
    for top_p in (1e-300, 5e-324, 1e-9):  # rounds to 0 in fp32: the nucleus must still hold the top token
        assert sample(logits, SamplingParams(4, temperature=1.0, top_p=top_p), generator) == best
    assert sample(torch.full((10,), float("nan")), SamplingParams(4, temperature=0.7), generator) in range(10)
    assert len({sample(logits / 8, SamplingParams(4, temperature=1.0), generator) for _ in range(50)}) > 1  # still samples


def test_extreme_sampling_values_do_not_fail_other_tenants(llama_pair, deltas):
    engine = make_engine(llama_pair[0], deltas, max_batch=16)
    prompt = token_ids(engine, "prose-row", PROMPTS[0])
    hostile = [SamplingParams(12, temperature=1e-39), SamplingParams(12, temperature=1e-300), SamplingParams(12, temperature=0.8, top_p=1e-300)]
    requests = [(name, prompt, GREEDY) for name in deltas] + [("prose-row", prompt, params) for params in hostile]
    outputs = engine.generate(requests)
    assert all(out[-1].finish_reason in ("length", "stop") for out in outputs), [out[-1].error for out in outputs]
    greedy_row = generated(outputs[list(deltas).index("prose-row")])[:12]
    assert generated(outputs[-3]) == generated(outputs[-2]) == greedy_row  # a vanishing temperature is greedy


def test_a_forward_pass_failing_for_one_request_fails_that_request_alone(llama_pair, deltas):
    clean = make_engine(llama_pair[0], deltas, max_batch=16)
    requests = [(name, token_ids(clean, name, PROMPTS[1]), GREEDY) for name in deltas]
    expected = [generated(out) for out in clean.generate(requests)]

    engine = make_engine(llama_pair[0], deltas, max_batch=16)
    poison = token_ids(engine, "prose-row", "zebra quartz")
    forward = engine.model.forward

    def failing_forward(batch, kv):
        if set(poison) <= set(batch.token_ids.tolist()):
            raise RuntimeError("this request's rows break the step")
        return forward(batch, kv)

    engine.model.forward = failing_forward
    outputs = engine.generate(requests + [("prose-row", poison, GREEDY)])
    assert [generated(out) for out in outputs[:-1]] == expected
    assert outputs[-1][-1].finish_reason == "error" and "forward" in outputs[-1][-1].error


def test_a_hot_finetune_cannot_starve_a_cold_one_of_a_slot(llama_pair, deltas):
    """One slot, a steady stream of short requests for prose-row that always keeps the slot in use,
    and one request for prose-late: it must get the slot within a bounded wait, not never."""
    engine = make_engine(llama_pair[0], deltas, max_batch=4, max_gpu_deltas=1)
    hot = token_ids(engine, "prose-row", PROMPTS[0])
    finished = {}
    engine.submit("prose-row", hot, SamplingParams(6, temperature=0), lambda _: None)
    engine.step()
    engine.submit("prose-late", token_ids(engine, "prose-late", PROMPTS[1]), SamplingParams(4, temperature=0),
                  lambda out: out.finish_reason and finished.setdefault("cold", (out.finish_reason, step)))
    for step in range(60):
        engine.submit("prose-row", hot, SamplingParams(6, temperature=0), lambda _: None)  # a new hot request every step
        engine.step()
        if "cold" in finished:
            break
    assert finished.get("cold", (None, None))[0] == "length"
    assert finished["cold"][1] < 20  # the slot drained as its hot requests (6 tokens each) finished


def test_unloading_a_delta_with_queued_requests_leaves_nothing_in_the_cpu_tier(llama_pair, deltas):
    engine = make_engine(llama_pair[0], {}, max_cpu_deltas=8)
    for name, path in deltas.items():
        engine.store.register(name, path)  # on disk only
    prompt = token_ids(engine, "prose-row", PROMPTS[0])
    outputs = [[] for _ in range(3)]
    for out in outputs:
        engine.submit("prose-row", prompt, SamplingParams(4, temperature=0), out.append)
    engine.store.unregister("prose-row")  # its requests are queued: they still finish
    while engine.has_work():
        engine.step()
    assert all(out[-1].finish_reason == "length" for out in outputs)
    assert engine.store.resident() == {"gpu": 0, "cpu": 0, "disk": 3}


def test_a_load_failure_is_retried_by_the_next_request_and_names_no_server_path(llama_pair, deltas, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(deltas["prose-row"], folder)
    engine = make_engine(llama_pair[0], {})
    engine.store.register("broken", folder)
    good = (folder / "delta.safetensors").read_bytes()
    (folder / "delta.safetensors").write_bytes(good[: len(good) // 2])  # truncated after registration
    prompt = token_ids(engine, "broken", PROMPTS[0])
    [failed] = engine.generate([("broken", prompt, GREEDY)])
    assert failed[-1].finish_reason == "error" and "broken" in failed[-1].error
    assert str(tmp_path) not in failed[-1].error and "truncated" in failed[-1].error
    (folder / "delta.safetensors").write_bytes(good)  # the operator repairs the file
    [served] = engine.generate([("broken", prompt, GREEDY)])
    assert served[-1].finish_reason == "length" and len(generated(served)) == GREEDY.max_tokens


def test_a_delta_whose_folder_vanished_fails_locally_without_the_network(llama_pair, deltas, tmp_path, monkeypatch):
    """A relative path to a deleted folder looks like a hub id: the tokenizer loader must not try the hub."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(deltas["code-chat"], tmp_path / "code-chat")  # carries its own tokenizer
    engine = make_engine(llama_pair[0], {})
    engine.store.register("code-chat", "code-chat")
    shutil.rmtree(tmp_path / "code-chat")
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(DeltaFormatError, match="code-chat: the folder is gone") as error:
        engine.submit("code-chat", [1, 2, 3], GREEDY, lambda _: None)
    assert not attempts and str(tmp_path) not in str(error.value)
    shutil.copytree(deltas["code-chat"], tmp_path / "code-chat")  # restored: the next request loads it
    assert engine.store.get("code-chat").tokenizer is not None and not attempts
