"""What the terminal shows (issue 19): fast help, whole names at 80 columns, Ctrl-C, numbers and plurals."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import run_cli
from test_errors import assert_nothing_written

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_importing_the_cli_loads_no_heavy_module():
    """`bitdelta --help`, `bitdelta COMMAND --help` and argument errors must not pay for torch (seconds)."""
    code = ("import sys, bitdelta, bitdelta.cli, bitdelta.eval.cli, bitdelta.server.cli; "
            "print(sorted({'torch', 'transformers', 'safetensors', 'fastapi'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_package_api_is_there_whatever_was_imported_first():
    import bitdelta
    import bitdelta.compress
    import bitdelta.distill
    from bitdelta.apply import load, merge
    from bitdelta.compress import compress
    from bitdelta.distill import DistillConfig, distill

    assert (bitdelta.compress, bitdelta.distill, bitdelta.merge, bitdelta.load) == (compress, distill, merge, load)
    assert bitdelta.DistillConfig is DistillConfig and set(bitdelta.__all__) <= set(dir(bitdelta))
    with pytest.raises(AttributeError):
        bitdelta.no_such_name


def test_help_lists_every_command_and_each_command_has_its_own_help():
    from bitdelta.eval.cli import eval_command
    from bitdelta.server.cli import serve

    code, stdout, _ = run_cli("--help")
    assert code == 0
    for command in ("compress", "distill", "merge", "info", "eval", "serve", "demo"):
        assert f" {command} " in stdout
    for function in (eval_command, serve):  # the summaries listed without importing them are theirs
        assert function.__doc__.split(".")[0][:40] in " ".join(stdout.split())
    for command, option in (("eval", "--finetuned"), ("serve", "--deltas"), ("compress", "--allow-unrelated-base")):
        code, stdout, _ = run_cli(command, "--help")
        assert code == 0 and option in stdout, stdout


def test_ctrl_c_is_one_line_and_exit_130(llama_delta, monkeypatch):
    import bitdelta.inspect

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(bitdelta.inspect, "summarize", interrupted)
    code, stdout, stderr = run_cli("info", llama_delta)
    assert (code, stdout, stderr) == (130, "", "interrupted; nothing written\n")


def test_ctrl_c_while_compressing_leaves_nothing(llama_pair, tmp_path, monkeypatch):
    from bitdelta.storage import ShardWriter

    def add(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "add", add)
    out = tmp_path / "out"
    code, _, stderr = run_cli("compress", *llama_pair, "-o", out, "-q")
    assert code == 130 and stderr == "interrupted; nothing written\n"
    assert_nothing_written(out)


def test_info_shows_every_tensor_name_whole_at_80_columns(llama_delta, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, stdout, _ = run_cli("info", llama_delta)
    assert code == 0 and "…" not in stdout
    assert max(map(len, stdout.splitlines())) <= 80
    for projection in PROJECTIONS:
        assert [line for line in stdout.splitlines() if f" layers.0.self_attn.{projection} " in line], stdout
    title = stdout[: stdout.index(" tensor ")]
    assert "'model.'" in title and "'.weight'" in title  # what the rows leave out is said once


def test_eval_table_shows_every_model_and_task_whole_at_80_columns():
    from bitdelta.eval.cli import results_tables
    from bitdelta.eval.metrics import gain_kept

    names = ("fine-tune", "base", "delta", "svd:equal", "bitdelta-row", "rtn:2")
    losses = dict(zip(names, (2.0, 3.0, 2.1, 2.4, 2.05, 2.2)))
    rows = [dict(model=name, ppl=2.7 ** loss, logit_mse=0.1, kl=0.01, top1=0.9, gain_kept={"loss": gain_kept(loss, 3.0, 2.0)},
                 tasks={"bitdelta_arith_mc": {"acc": 0.5, "acc_norm": 0.25}}) for name, loss in losses.items()]
    result = dict(finetuned="/some/where/finetuned", windows=32, seq_len=256, data="heldout.txt", rows=rows)
    console = Console(width=80, file=io.StringIO())
    for table in results_tables(result):
        console.print(table)
    text = console.file.getvalue()
    assert "…" not in text and "-0.0%" not in text and " 0.0% " in text and " 100.0% " in text and " 0.25 " in text
    assert max(map(len, text.splitlines())) <= 80
    for name in names:
        assert [line for line in text.splitlines() if f" {name} " in line], text


@pytest.mark.parametrize("share, shown", [(-0.0, "0.0%"), (-0.0004, "0.0%"), (0.0004, "0.0%"), (-0.0251, "-2.5%"), (0.955, "95.5%")])
def test_percentages_never_show_minus_zero(share, shown):
    from bitdelta.display import percent

    assert percent(share) == shown


def test_counts_of_one_are_singular(llama_pair, tmp_path):
    from bitdelta.display import count

    assert (count(1, "step"), count(2, "step"), count(0, "delta")) == ("1 step", "2 steps", "0 deltas")
    delta = tmp_path / "delta"
    code, _, stderr = run_cli("compress", *llama_pair, "-o", delta, "-q", "--include", "model.layers.0.self_attn.q_proj.weight")
    assert code == 0, stderr
    code, stdout, _ = run_cli("info", delta)
    assert code == 0 and "1 tensor 1-bit" in " ".join(stdout.split())


def test_eval_refuses_an_output_in_a_missing_folder_before_reading_models(llama_pair, llama_delta, tmp_path):
    output = tmp_path / "missing" / "results.json"
    code, _, stderr = run_cli("eval", tmp_path / "no-such-base", "--finetuned", llama_pair[1], "--delta", llama_delta, "--output", output)
    assert code == 1 and stderr.startswith("error: ") and str(output.parent) in stderr and len(stderr.strip().splitlines()) == 1
