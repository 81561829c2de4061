"""Task accuracy through EleutherAI's lm-evaluation-harness, on a model already in memory.

The delta-applied model is an ordinary `transformers` model, so the harness runs it exactly as any
Hugging Face model: `HFLM(pretrained=model, tokenizer=tokenizer)` + `simple_evaluate`. Tasks are
harness names (`truthfulqa_mc2`, `gsm8k`, ...), tasks under `include_path`, or paths to task YAML
files; a YAML's relative `dataset_kwargs.data_files` are taken relative to the YAML itself, so a
task and its local data travel together (tests/data/ holds one).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from bitdelta.errors import EvaluationError


@dataclass(frozen=True)
class TaskSet:
    """Checked task specs and the TaskManager that resolves them, prepared before any model loads."""

    specs: list  # harness names (str) or inline task configs (dict) from YAML files
    manager: object


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def _inline(path: Path) -> dict:
    """A task YAML as an inline config, its relative data files resolved against its folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path)
    except Exception as error:
        raise EvaluationError(f"task file {path} cannot be read ({type(error).__name__}: {error})") from None
    if "task" not in config:
        raise EvaluationError(f"task file {path} has no 'task' key; see lm-eval's task guide for the YAML format")
    config = copy.deepcopy(config)
    files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: _relative_to(path.parent, f) for split, f in files.items()}
    elif files is not None:
        config["dataset_kwargs"]["data_files"] = _relative_to(path.parent, files)
    return config


def _relative_to(folder: Path, files):
    if isinstance(files, list):
        return [_relative_to(folder, f) for f in files]
    return str(folder / files) if not Path(files).is_absolute() else files


def prepare_tasks(tasks: list[str], include_path: str | Path | None = None) -> TaskSet:
    """Check every task exists before any model is loaded; unknown names fail with one line."""
    from lm_eval.tasks import TaskManager

    specs, names = [], []
    for task in tasks:
        if _is_yaml(task):
            path = Path(task).expanduser()
            if not path.is_file():
                raise EvaluationError(f"task file {task}: no such file")
            specs.append(_inline(path))
        else:
            specs.append(task)
            names.append(task)
    # Indexing the ~15k built-in task configs takes seconds: skip it when only local files are asked for.
    manager = TaskManager(include_path=str(include_path) if include_path else None, include_defaults=bool(names))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise EvaluationError(f"unknown lm-eval task {', '.join(unknown)}; pass a harness task name (`lm-eval ls tasks`), "
                              "a task YAML file, or --include-path with your task folder")
    _check_datasets_reachable(names, manager)
    return TaskSet(specs, manager)


def _check_datasets_reachable(names: list[str], manager) -> None:
    """Refuse, before any model loads, a task whose data set is neither cached nor downloadable:
    offline, the harness would otherwise retry the hub for minutes and end in a long traceback."""
    missing = [(name, path) for name in names for path in _dataset_paths(name, manager) if not _dataset_cached(path)]
    if missing and not _hub_reachable():
        name, path = missing[0]
        raise EvaluationError(
            f"lm-eval task {name} needs the data set {path} from the Hugging Face hub, which cannot be reached from here and "
            "has no cached copy; run the task once where the hub is reachable (then HF_DATASETS_OFFLINE=1 uses the cache), "
            "or pass a task YAML whose dataset_kwargs.data_files name local files"
        )


def _dataset_paths(name: str, manager, seen: set | None = None) -> set[str]:
    """The hub data sets behind a task, a group or a tag (local paths left out)."""
    seen = set() if seen is None else seen
    entry = manager.task_index.get(name)
    if entry is None or name in seen:
        return set()
    seen.add(name)
    config = entry.cfg or {}
    members = set(entry.tags or ()) if config == {} else set(config.get("task") or ()) if isinstance(config.get("task"), list) else set()
    paths = {config["dataset_path"]} if config.get("dataset_path") and not Path(config["dataset_path"]).exists() else set()
    for member in members:
        paths |= _dataset_paths(member, manager, seen)
    return paths


def _dataset_cached(path: str) -> bool:
    from datasets import config as datasets_config
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}").is_dir() or \
        (Path(datasets_config.HF_DATASETS_CACHE) / path.replace("/", "___")).is_dir()


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return False
    return True


def run_tasks(model, tokenizer, tasks: TaskSet, *, batch_size: int = 8, limit: int | float | None = None,
              num_fewshot: int | None = None, seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for `model` as lm-eval reports them (stderr entries dropped)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              max_length=getattr(model.config, "max_position_embeddings", None))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=copy.deepcopy(tasks.specs), task_manager=tasks.manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    return {
        task: {metric.split(",")[0]: float(value) for metric, value in scores.items() if _is_number(value) and "stderr" not in metric and metric != "sample_len"}
        for task, scores in results["results"].items()
    }


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, str)
