"""The OpenAI-compatible server, started for real on localhost, driven by the official `openai`
client: several tiny fine-tunes answered concurrently, each exactly as its merged model alone."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import served_deltas
from test_engine import _merged, alone

KEY, ADMIN_KEY = "user-key", "admin-key"
PROMPTS = ("The value of", "def parse(self, text):\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def eventually(condition, seconds: float = 10) -> bool:
    """Whether `condition()` holds within `seconds`, polled: for what another process does a moment later."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def wait_healthy(url: str, process=None, seconds: float = 120, log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def deltas_dir(llama_pair, tmp_path_factory) -> Path:
    """A private copy of the shared deltas (the admin tests add and remove folders)."""
    source = served_deltas(*llama_pair, tmp_path_factory.getbasetemp() / "served-deltas")
    folder = tmp_path_factory.mktemp("server") / "deltas"
    for name, path in source.items():
        shutil.copytree(path, folder / name)
    shutil.copytree(source["code-chat"], folder / "vanishing")  # its folder is deleted while served, never used before
    shutil.copytree(source["prose-row"], folder / "truncated")  # never served: refused at startup
    weights = folder / "truncated" / "delta.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return folder


class HubListener:
    """A loopback socket standing in for the Hugging Face hub (HF_ENDPOINT): counts who knocks."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()


@pytest.fixture(scope="module")
def hub() -> HubListener:
    return HubListener()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-log") / "server.log"


@pytest.fixture(scope="module")
def server(llama_pair, deltas_dir, hub, server_log):
    """`python -m bitdelta.server` (the `bitdelta serve` command) in a subprocess, with the hub
    pointed at a listener that records any attempt to reach it."""
    port = free_port()
    command = [sys.executable, "-m", "bitdelta.server", str(llama_pair[0]), "--deltas", str(deltas_dir), "--port", str(port),
               "--device", "cpu", "--max-batch", "16", "--max-gpu-deltas", "4", "--api-key", KEY, "--admin-key", ADMIN_KEY]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {"HF_ENDPOINT": hub.url}
    with open(server_log, "w") as log:  # a file, not a pipe nobody reads: a chatty server must never block on it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log=server_log)
        yield url
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def admin(server: str, method: str, path: str, key: str = ADMIN_KEY, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=60, **kwargs)


def merged_answer(llama_pair, deltas_dir: Path, model: str, prompt_ids: list[int], max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = llama_pair[0] if model == "llama-base" else deltas_dir / model
    reference = AutoModelForCausalLM.from_pretrained(folder) if model == "llama-base" else _merged(llama_pair[0], folder)
    return AutoTokenizer.from_pretrained(folder).decode(alone(reference, prompt_ids, max_tokens), skip_special_tokens=True)


def assert_serves_like_the_merged_model(client, llama_pair, deltas_dir: Path, model: str, max_tokens: int = 4) -> None:
    """Greedy, so the answer is fixed: a sampled one may end early on EOS and prove nothing either way."""
    from transformers import AutoTokenizer

    answer = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=max_tokens, temperature=0)
    ids = AutoTokenizer.from_pretrained(llama_pair[0])(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert answer.choices[0].text == merged_answer(llama_pair, deltas_dir, model, ids, max_tokens), model


def test_models_lists_the_base_and_every_delta(client):
    assert sorted(m.id for m in client.models.list()) == ["code-chat", "llama-base", "prose-late", "prose-matrix", "prose-row", "vanishing"]


def test_concurrent_requests_for_several_finetunes_match_each_merged_model(client, llama_pair, deltas_dir):
    from transformers import AutoTokenizer

    jobs = [(model, prompt) for prompt in PROMPTS for model in ("prose-matrix", "prose-row", "prose-late", "code-chat", "llama-base")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0), jobs))
    tokenizer = AutoTokenizer.from_pretrained(llama_pair[0])
    for (model, prompt), answer in zip(jobs, answers):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert answer.choices[0].text == merged_answer(llama_pair, deltas_dir, model, ids, 12), model
        assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == 12
        assert answer.model == model and answer.choices[0].finish_reason == "length"


def test_chat_uses_the_finetunes_own_template(client, llama_pair, deltas_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Write a loop."}]
    for model in ("code-chat", "prose-row"):  # code-chat carries its own template, prose-row the base's
        tokenizer = AutoTokenizer.from_pretrained(deltas_dir / model)
        ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == merged_answer(llama_pair, deltas_dir, model, ids, 10)
        assert answer.usage.prompt_tokens == len(ids)
    assert "### assistant" in AutoTokenizer.from_pretrained(deltas_dir / "code-chat").apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_streaming_matches_non_streaming(client):
    for stop in (None, ["e"]):
        whole = client.completions.create(model="prose-row", prompt=PROMPTS[0], max_tokens=20, temperature=0.8, seed=3, stop=stop)
        chunks = list(client.completions.create(model="prose-row", prompt=PROMPTS[0], max_tokens=20, temperature=0.8, seed=3, stop=stop, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = dict(model="code-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**chat)
    parts = list(client.chat.completions.create(**chat, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


def test_errors_are_openai_style(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    for bad in (dict(temperature=5), dict(n=2), dict(max_tokens=0), dict(logprobs=2), dict(top_p=0)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="prose-row", prompt="x", **{"max_tokens": 2, **bad})
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        client.completions.create(model="prose-row", prompt="word " * 200, max_tokens=2)
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{server}/v1/chat/completions", json={"model": "prose-row"}, headers={"Authorization": f"Bearer {KEY}"}).status_code == 400


def test_every_endpoint_but_health_needs_the_key(server):
    assert httpx.get(f"{server}/health").status_code == 200
    unauthorized = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        unauthorized.models.list()
    with pytest.raises(openai.AuthenticationError):
        unauthorized.completions.create(model="prose-row", prompt="x", max_tokens=2)
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert admin(server, "DELETE", "/v1/deltas/prose-row", key=KEY).status_code == 401  # the user key is not the admin key
    assert admin(server, "POST", "/v1/deltas", key=KEY, json={"name": "prose-row"}).status_code == 401


def test_hot_unload_and_load_during_traffic(client, server, llama_pair, deltas_dir):
    expected = client.completions.create(model="prose-late", prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text
    stop, failures, served = threading.Event(), [], []

    def traffic():
        while not stop.is_set():
            try:
                served.append(client.completions.create(model="prose-row", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text)
            except Exception as error:  # noqa: BLE001 -- collected and asserted below
                failures.append(error)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        in_flight = iter(client.completions.create(model="prose-late", prompt=PROMPTS[1], max_tokens=30, temperature=0, stream=True))
        chunks = [next(in_flight)]  # its first token is out: the request is running
        assert admin(server, "DELETE", "/v1/deltas/prose-late").json() == {"id": "prose-late", "object": "model", "deleted": True}
        chunks += list(in_flight)  # the request already running was not affected
        assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(expected)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="prose-late", prompt=PROMPTS[1], max_tokens=8)
        assert admin(server, "POST", "/v1/deltas", json={"name": "prose-late"}).status_code == 200
        assert client.completions.create(model="prose-late", prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text == expected
        assert admin(server, "POST", "/v1/deltas", json={"name": "prose-late"}).status_code == 409
    finally:
        stop.set()
        worker.join()
    assert not failures and len(served) >= 2 and len(set(served)) == 1


def test_runtime_loads_only_by_name_from_the_deltas_folder(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("../outside", str(outside), "a/b", "..", "prose-row/../prose-row", "%2e%2e", ""):
        response = admin(server, "POST", "/v1/deltas", json={"name": name})
        assert response.status_code in (400, 404) and "error" in response.json(), name
    assert admin(server, "POST", "/v1/deltas", json={"name": "missing"}).status_code == 404
    assert admin(server, "DELETE", "/v1/deltas/llama-base").status_code == 400


def test_hostile_or_foreign_deltas_are_refused_and_serving_goes_on(client, server, deltas_dir, pairs, llama_pair):
    from bitdelta import compress

    garbage = deltas_dir / "garbage"
    shutil.copytree(deltas_dir / "prose-row", garbage)
    (garbage / "delta.safetensors").write_bytes(b"\x00" * 64)
    config = json.loads((garbage / "bitdelta_config.json").read_text())
    config["files"]["delta.safetensors"] = "0" * 64
    (garbage / "bitdelta_config.json").write_text(json.dumps(config))
    compress(*pairs["qwen2"], deltas_dir / "foreign", progress=False)
    (deltas_dir / "not-json").mkdir()
    (deltas_dir / "not-json" / "bitdelta_config.json").write_text("{{{")
    for name, reason in (("garbage", "not a readable safetensors file"), ("foreign", "fingerprint"), ("not-json", "JSON")):
        response = admin(server, "POST", "/v1/deltas", json={"name": name})
        assert response.status_code == 400 and reason in response.json()["error"]["message"], name
    assert "garbage" not in [m.id for m in client.models.list()]
    assert_serves_like_the_merged_model(client, llama_pair, deltas_dir, "prose-row")


def post(server: str, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server}{path}", headers={"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}, timeout=60, **kwargs)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(server):
    big = {"model": "prose-row", "prompt": "word " * 1_000_000, "max_tokens": 2}  # 5 MB, over the default 4
    assert assert_openai_error(post(server, "/v1/completions", json=big), 413)["code"] == "request_too_large"
    chunks = (b" " * 65536 for _ in range(80))  # no Content-Length: counted as it arrives
    assert_openai_error(post(server, "/v1/completions", content=chunks, headers={"Content-Type": "application/json"}), 413)
    assert httpx.get(f"{server}/health").status_code == 200


def test_a_prompt_longer_than_the_context_is_refused_before_it_is_tokenized(server):
    for path, body in (("/v1/completions", {"prompt": "word " * 600_000}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600_000}]})):
        error = assert_openai_error(post(server, path, json={"model": "code-chat", "max_tokens": 2, **body}), 400)
        assert error["code"] == "context_length_exceeded" and "at least" in error["message"]  # the bound, not the tokenizer


def test_every_refusal_is_an_openai_error_and_the_connection_stays_usable(server):
    cases = [
        ({"prompt": "x", "seed": 2**64}, "seed"), ({"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "\ud800"}, "prompt"), ({"prompt": [True, False]}, "prompt"), ({"prompt": [[1], [2]]}, "prompt"),
        ({"prompt": "x", "stop": ["\udfff"]}, "stop.0"), ({"prompt": "x", "response_format": {"type": "json_object"}}, None),
    ]
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    for fields, param in cases:
        body = json.dumps({"model": "prose-row", "max_tokens": 2, **fields}, ensure_ascii=True)
        connection.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and error["type"] == "invalid_request_error" and error["param"] == param, (fields, error)
        assert response.getheader("connection") != "close"
    for raw, fragment in ((b"\xff\xfe{", "UTF-8"), (b'{"model": "prose-row", "prompt": "x",,}', "not valid JSON")):
        connection.request("POST", "/v1/completions", raw, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 400 and fragment in error["message"] and error["param"] is None, error
    connection.request("POST", "/v1/completions", json.dumps({"model": "prose-row", "prompt": "x", "max_tokens": 2, "seed": 2**64 - 1, "ignore_eos": True,
                                                             "response_format": {"type": "text"}}),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()  # the same connection still serves
    assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 2
    connection.request("GET", "/v1/no-such-endpoint", headers={"Authorization": f"Bearer {KEY}"})
    response = connection.getresponse()
    assert response.status == 404 and "message" in json.loads(response.read())["error"]


def test_a_served_delta_whose_files_vanish_gets_a_clean_error_without_the_hub(client, server, deltas_dir, hub, llama_pair):
    shutil.rmtree(deltas_dir / "vanishing")  # served since startup, nothing of it read yet
    for _ in range(2):
        error = assert_openai_error(post(server, "/v1/completions", json={"model": "vanishing", "prompt": "x", "max_tokens": 2}), 500)
        assert "vanishing" in error["message"] and str(deltas_dir) not in error["message"]
    assert hub.connections == 0
    assert_serves_like_the_merged_model(client, llama_pair, deltas_dir, "code-chat")


def test_load_errors_name_no_server_path(server, deltas_dir):
    broken = deltas_dir / "broken-file"
    shutil.copytree(deltas_dir / "prose-row", broken)
    data = (broken / "delta.safetensors").read_bytes()
    (broken / "delta.safetensors").write_bytes(data[: len(data) // 2])
    error = assert_openai_error(admin(server, "POST", "/v1/deltas", json={"name": "broken-file"}), 400)
    assert "broken-file" in error["message"] and str(deltas_dir) not in error["message"]
    shutil.rmtree(broken)


def test_symlinked_deltas_follow_one_containment_rule(llama_pair, deltas_dir, tmp_path):
    """A folder of --deltas that is a symlink to elsewhere is refused at startup as POST /v1/deltas
    refuses it; the operator serves such a delta by naming it (--delta NAME=PATH)."""
    from fastapi.testclient import TestClient

    from bitdelta.server.cli import build_server

    folder = tmp_path / "deltas"
    folder.mkdir()
    shutil.copytree(deltas_dir / "prose-row", folder / "inside")
    shutil.copytree(deltas_dir / "prose-matrix", tmp_path / "elsewhere")
    (folder / "linked").symlink_to(tmp_path / "elsewhere")
    engine, app = build_server(str(llama_pair[0]), folder, {"named": tmp_path / "elsewhere"}, config=_cpu_config())
    assert sorted(engine.store.names()) == ["inside", "llama-base", "named"]
    with TestClient(app) as http_client:
        refused = http_client.post("/v1/deltas", json={"name": "linked"})
    assert refused.status_code == 400 and "outside the deltas directory" in refused.json()["error"]["message"]


def _cpu_config():
    from bitdelta.engine import EngineConfig

    return EngineConfig(device="cpu", max_batch=2)


def test_delta_names_are_matched_whole():
    from bitdelta.server.settings import valid_delta_name

    assert valid_delta_name("prose-row") and valid_delta_name("v1.2_b")
    for name in ("d1\n", "a/b", "..", "a..b", "", ".hidden", "x" * 200):
        assert not valid_delta_name(name), name


def test_the_log_has_a_line_per_request_and_the_cause_of_each_refusal(client, server, server_log):
    client.completions.create(model="prose-matrix", prompt=PROMPTS[0], max_tokens=3, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="prose-matrix", prompt="x", max_tokens=2, seed=2**64)

    def logged() -> bool:  # a line is written once its response is sent
        lines = server_log.read_text().splitlines()
        return (any('"POST /v1/completions HTTP/1.1" 200 model=prose-matrix tokens=' in line and line.endswith("+3 " + line.split()[-1])
                    for line in lines)
                and any('"POST /v1/completions HTTP/1.1" 400 model=prose-matrix' in line and "seed" in line for line in lines))

    assert eventually(logged)
    lines = server_log.read_text().splitlines()
    assert any(line.startswith("WARNING") and "not serving truncated" in line and "incomplete metadata" in line for line in lines)
    assert not any('"GET /health' in line for line in lines)  # probes are DEBUG


def test_a_deltas_folder_of_which_nothing_fits_the_base_refuses_to_start(llama_pair, pairs, tmp_path):
    from bitdelta import compress
    from bitdelta.errors import BitDeltaError
    from bitdelta.server.cli import build_server

    compress(*pairs["qwen2"], tmp_path / "deltas" / "foreign", progress=False)
    with pytest.raises(BitDeltaError, match="none of the 1 folders in --deltas .* can be served over this base .*foreign: .*fingerprint"):
        build_server(str(llama_pair[0]), tmp_path / "deltas", config=_cpu_config())


def test_metrics_in_prometheus_format(client, server):
    client.completions.create(model="prose-matrix", prompt=PROMPTS[0], max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for metric in ("bitdelta_requests_total{finish_reason=\"length\",model=\"prose-matrix\"}", "bitdelta_generation_tokens_total",
                   "bitdelta_queue_depth", "bitdelta_batch_size_bucket", "bitdelta_deltas_resident{tier=\"gpu\"}",
                   "bitdelta_time_to_first_token_seconds_count", "bitdelta_inter_token_latency_seconds_count", "bitdelta_kv_cache_blocks"):
        assert metric in text, metric


# ---- a deliberately slow in-process server: one sequence at a time, one waiting ----

@pytest.fixture(scope="module")
def slow_server(llama_pair, deltas_dir):
    import uvicorn

    from bitdelta.engine import EngineConfig
    from bitdelta.server.cli import build_server

    engine, app = build_server(str(llama_pair[0]), deltas_dir, config=EngineConfig(max_batch=1, max_queue=2, device="cpu"))
    forward = engine.model.forward
    engine.model.forward = lambda batch, kv: (time.sleep(0.03), forward(batch, kv))[1]  # a bigger model's step time
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    engine.start()
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield url, engine, thread
    server.should_exit = True
    thread.join(10)
    engine.stop()


_refused_headers: list = []


def test_a_full_queue_answers_429(slow_server):
    url, _, _ = slow_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

    def attempt(_):
        try:
            return client.completions.create(model="prose-row", prompt="x", max_tokens=15, extra_body={"ignore_eos": True}).usage.completion_tokens
        except openai.RateLimitError as error:
            _refused_headers.append(error.response.headers)
            return 429

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert results.count(429) >= 1 and results.count(15) >= 2 and results.count(429) + results.count(15) == 6
    assert _refused_headers and all(h.get("retry-after") == "1" for h in _refused_headers)


def cancelled(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("bitdelta_requests_total") and 'finish_reason="cancelled"' in line:
            return float(line.split()[-1])
    return 0.0


def test_a_client_that_disconnects_has_its_request_cancelled(slow_server):
    url, engine, _ = slow_server
    before = cancelled(url)
    with httpx.stream("POST", f"{url}/v1/completions", json={"model": "prose-row", "prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}) as response:
        next(response.iter_lines())  # the first token arrived; now hang up
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client giving up
        httpx.post(f"{url}/v1/completions", json={"model": "prose-row", "prompt": "x", "max_tokens": 100, "ignore_eos": True}, timeout=0.5)
    assert eventually(lambda: cancelled(url) >= before + 2 and not engine.stats()["running"])
    assert cancelled(url) == before + 2 and engine.stats()["running"] == 0 and engine.kv.blocks_used == 0


def test_templating_and_tokenizing_run_off_the_event_loop(slow_server, monkeypatch):
    """A long prompt's tokenization must not hold up the loop that answers every other client."""
    url, engine, loop_thread = slow_server
    tokenizer = engine.store.get("code-chat").tokenizer
    threads = []
    for method in ("__call__", "apply_chat_template"):
        real = getattr(type(tokenizer), method)
        monkeypatch.setattr(type(tokenizer), method, lambda self, *a, real=real, **k: (threads.append(threading.current_thread()), real(self, *a, **k))[1])
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    client.completions.create(model="code-chat", prompt="word " * 10, max_tokens=1)
    client.chat.completions.create(model="code-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert len(threads) >= 3 and loop_thread not in threads


def test_serve_passes_its_engine_options_to_the_engine(monkeypatch):
    from typer.testing import CliRunner

    import bitdelta.server.cli as server_cli
    from bitdelta.cli import app

    seen = {}
    monkeypatch.setattr(server_cli, "run_server", lambda base, deltas, extra, host, port, config, *keys: seen.update(config=config))
    result = CliRunner().invoke(app, ["serve", "some-base", "--prefill-chunk", "1024", "--max-batch", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (seen["config"].prefill_chunk, seen["config"].max_batch) == (1024, 8)
    for option in ("--prefill-chunk", "--max-queue", "--max-body-mb"):
        refused = CliRunner().invoke(app, ["serve", "some-base", option, "0"])
        assert refused.exit_code != 0 and option in refused.output
