"""bitdelta on Ray Serve: a local Ray cluster, two CPU engine replicas of a tiny genuinely trained
base, three fine-tunes behind one OpenAI endpoint (loopback only)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import served_deltas
from test_server import free_port, merged_answer

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

FINETUNES = ("prose-matrix", "prose-row", "code-chat")
PROMPTS = ("The value of", "def parse(self, text):\n")


@pytest.fixture(scope="module")
def deltas_dir(llama_pair, tmp_path_factory):
    source = served_deltas(*llama_pair, tmp_path_factory.getbasetemp() / "served-deltas")
    folder = tmp_path_factory.mktemp("ray") / "deltas"
    for name in FINETUNES:
        shutil.copytree(source[name], folder / name)
    shutil.copytree(source["prose-late"], folder / "unload-me")
    return folder


@pytest.fixture(scope="module")
def ray_app(llama_pair, deltas_dir):
    from bitdelta.engine import EngineConfig
    from bitdelta.ray import RayServeConfig, build_app

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # two deltas held per replica, four fine-tunes over two replicas: routing decides whether deltas stay put
    engine = EngineConfig(device="cpu", dtype="float32", max_batch=2, max_queue=4, max_gpu_deltas=2, max_cpu_deltas=2)
    serve.run(build_app(RayServeConfig(str(llama_pair[0]), str(deltas_dir), engine, replicas=2)), name="bitdelta", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def complete(url: str, model: str, prompt: str, max_tokens: int = 8, stream: bool = False) -> tuple[str, str | None, int]:
    """(text, the replica that served it, status) of a greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        text = response.json()["choices"][0]["text"] if response.status_code == 200 else ""
        return text, response.headers.get("x-bitdelta-replica"), response.status_code
    import json

    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        return "".join(e["choices"][0]["text"] for e in events if "choices" in e), response.headers.get("x-bitdelta-replica"), response.status_code


def test_every_answer_through_the_ingress_equals_its_merged_finetune(ray_app, llama_pair, deltas_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_pair[0])
    jobs = [(model, prompt, stream) for model in (*FINETUNES, "llama-base") for prompt in PROMPTS for stream in (False, True)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda job: complete(ray_app, *job[:2], stream=job[2]), jobs))
    replicas = set()
    for (model, prompt, _), (text, replica, status) in zip(jobs, answers):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert status == 200 and text == merged_answer(llama_pair, deltas_dir, model, ids, 8), (model, prompt)
        replicas.add(replica)
    assert len(replicas) == 2  # both replicas served


def replica_stats() -> dict[str, dict]:
    """Each replica's engine stats (calls land on replicas at random: ask until both answered)."""
    handle = serve.get_deployment_handle("EngineReplica", app_name="bitdelta")
    seen = {}
    for _ in range(60):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


def test_requests_go_to_a_replica_that_holds_their_delta(ray_app):
    """Each replica holds two deltas; a steady mix of three fine-tunes must be served from where the
    deltas already are: at least 90% of the requests read no delta from disk."""
    for model in FINETUNES * 2:  # warm-up
        complete(ray_app, model, PROMPTS[0], 2)
    loads_before = sum(s["delta_loads"] for s in replica_stats().values())
    jobs = [FINETUNES[i % 3] for i in range(36)]
    with ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda model: complete(ray_app, model, PROMPTS[1], 2)[2], jobs))
    loads = sum(s["delta_loads"] for s in replica_stats().values()) - loads_before
    assert statuses == [200] * len(jobs) and loads <= 0.1 * len(jobs), loads


def test_overload_is_refused_with_retry_after(ray_app):
    def attempt(_):
        response = httpx.post(f"{ray_app}/v1/completions", json={"model": "prose-row", "prompt": "x", "max_tokens": 40, "ignore_eos": True}, timeout=120)
        return response.status_code, response.headers.get("retry-after"), response.text[:200]

    with ThreadPoolExecutor(32) as pool:  # more than the two replicas hold: 2 x (batch 2 + queue 4 + 1)
        results = list(pool.map(attempt, range(32)))
    refused = [r for r in results if r[0] != 200]
    assert refused and all(status in (429, 503) and after for status, after, _ in refused), [r for r in results if not r[1]]
    assert any(status == 200 for status, _, _ in results)


def test_an_unloaded_delta_is_gone_from_every_replica(ray_app):
    for _ in range(6):  # held by a replica or two
        assert complete(ray_app, "unload-me", PROMPTS[0], 2)[2] == 200
    assert httpx.delete(f"{ray_app}/v1/deltas/unload-me", timeout=60).status_code == 200
    assert complete(ray_app, "unload-me", PROMPTS[0], 2)[2] == 404
    time.sleep(2.5)  # > CATALOG_POLL_SECONDS
    seen = replica_stats()
    assert len(seen) == 2 and all("unload-me" not in stats["models"] for stats in seen.values())
    assert "unload-me" not in [m["id"] for m in httpx.get(f"{ray_app}/v1/models").json()["data"]]


def test_a_replica_killed_mid_request_costs_only_a_retry(ray_app):
    import json

    outcomes, start = [], threading.Barrier(5)

    def stream_one(index: int) -> None:
        body = {"model": FINETUNES[index % 3], "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True}
        start.wait()
        try:
            with httpx.stream("POST", f"{ray_app}/v1/completions", json=body, timeout=120) as response:
                if response.status_code != 200:
                    outcomes.append(("refused", response.status_code, response.headers.get("retry-after")))
                    return
                events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
            finish = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
            errors = [e["error"] for e in events if "error" in e]
            outcomes.append(("error event", errors[0]["type"], None) if errors else ("completed", finish[-1], None))
        except httpx.HTTPError as error:
            outcomes.append(("broken", type(error).__name__, None))

    workers = [threading.Thread(target=stream_one, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    start.wait()
    time.sleep(0.5)
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    for worker in workers:
        worker.join()
    assert len(outcomes) == 4
    for kind, detail, retry_after in outcomes:
        assert (kind == "completed" and detail in ("length", "stop")) or (kind == "refused" and detail == 503 and retry_after) \
            or (kind == "error event" and detail == "server_error"), outcomes
    deadline = time.time() + 90
    while time.time() < deadline:  # Serve replaces the replica
        if all(complete(ray_app, model, PROMPTS[0], 2)[2] == 200 for model in FINETUNES):
            break
        time.sleep(1)
    assert all(complete(ray_app, model, PROMPTS[0], 2)[2] == 200 for model in FINETUNES)


def test_the_serve_config_file_and_serve_run_arguments_make_the_same_config(llama_pair, deltas_dir):
    import yaml

    from bitdelta.errors import BitDeltaError
    from bitdelta.ray.app import config_from_args

    [application] = yaml.safe_load((Path(__file__).parent.parent / "deploy" / "serve_config.yaml").read_text())["applications"]
    assert application["import_path"] == "bitdelta.ray:app"
    args = application["args"] | {"base": str(llama_pair[0]), "deltas": str(deltas_dir)}
    from_file = config_from_args(args)
    from_command_line = config_from_args({k: str(v) for k, v in args.items()})  # `serve run ... key=value` passes strings
    assert from_file == from_command_line
    assert from_file.replica_options()["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 32}
    assert from_file.engine.max_gpu_deltas == 32 and from_file.api_key == "change-me"
    with pytest.raises(BitDeltaError, match="unknown argument"):
        config_from_args(args | {"max_bach": "8"})
    with pytest.raises(BitDeltaError, match="min_replicas and max_replicas"):
        config_from_args({"base": str(llama_pair[0]), "deltas": str(deltas_dir), "min_replicas": "2"})


def test_serve_with_replicas_deploys_on_ray(llama_pair, deltas_dir, monkeypatch):
    from typer.testing import CliRunner

    import bitdelta.ray.launch as launch
    from bitdelta.cli import app

    seen = {}
    monkeypatch.setattr(launch, "run_on_ray", lambda config, host, port, address: seen.update(config=config, address=address, port=port))
    result = CliRunner().invoke(app, ["serve", str(llama_pair[0]), "--deltas", str(deltas_dir), "--replicas", "3", "--max-batch", "8",
                                      "--ray-address", "ray://head:10001", "--port", "9000"])
    assert result.exit_code == 0, result.output
    assert (seen["config"].replicas, seen["config"].engine.max_batch, seen["address"], seen["port"]) == (3, 8, "ray://head:10001", 9000)
    refused = CliRunner().invoke(app, ["serve", str(llama_pair[0]), "--replicas", "2", "--delta", f"x={deltas_dir / 'prose-row'}"])
    assert refused.exit_code != 0
