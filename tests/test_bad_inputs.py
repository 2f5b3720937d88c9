"""Every bad input a clear error, nothing lost: one line, exit code 2 (130 for Ctrl-C), no traceback, and no
file written or changed. One test per kind of fault; tiny heads, no model loads unless the fault needs one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from featspec.heads.checkpoint import save_head
from featspec.heads.eagle3 import Eagle3Head
from featspec.heads.layers import HeadConfig

from conftest import llama_config
from test_cli import assert_one_line_error, run_cli


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def head_dir(tmp_path) -> Path:
    head = Eagle3Head(HeadConfig.from_target(llama_config(layers=6), draft_vocab_size=16))
    head.set_vocab(torch.arange(16))
    save_head(head, tmp_path / "head")
    return tmp_path / "head"


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


CORRUPTIONS = {
    "truncated weights": (lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:100]), ["model.safetensors", "not a readable"]),
    "empty weights": (lambda d: _weights(d).write_bytes(b""), ["model.safetensors", "not a readable"]),
    "garbage weights": (lambda d: _weights(d).write_bytes(os.urandom(4096)), ["model.safetensors", "not a readable"]),
    "config is a list": (lambda d: (d / "config.json").write_text("[1, 2]"), ["config.json", "list"]),
    "config lacks a key": (lambda d: _edit_config(d, lambda c: c.pop("intermediate_size")), ["intermediate_size"]),
    "number as a string": (lambda d: _edit_config(d, lambda c: c.update(hidden_size="48")), ["hidden_size", "'48'"]),
    "config not JSON": (lambda d: (d / "config.json").write_text("{hidden"), ["config.json", "not valid JSON"]),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), ["config", "not UTF-8"]),
    "NaN weights": (lambda d: _edit_weights(d, "fc.weight", float("nan")), ["fc.weight", "NaN"]),
    "layer ids a string": (lambda d: _edit_config(d, lambda c: c["featspec"].update(layer_ids="2,3,4")), ["layer ids"]),
}


def _edit_config(d: Path, change) -> None:
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_weights(d: Path, key: str, value: float) -> None:
    from safetensors.torch import load_file

    t = load_file(str(_weights(d)))
    t[key] = torch.full_like(t[key], value)
    save_file(t, str(_weights(d)))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_head_is_one_line(kind, head_dir, tmp_path, capsys):
    corrupt, needles = CORRUPTIONS[kind]
    corrupt(head_dir)
    before = snapshot(head_dir)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "export", "--head", str(head_dir), "--format", "vllm", "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists() and snapshot(head_dir) == before


@pytest.mark.parametrize("variant", ["float16", "pytorch_model.bin"])
def test_odd_but_valid_heads_load_and_say_how(variant, head_dir, tmp_path, capsys):
    """An fp16 head or a pytorch_model.bin head is fine: it loads, and the run says what it was stored in."""
    from safetensors.torch import load_file

    from featspec.drafters import load_feature_head
    from featspec.drafters.runtime import tell
    from featspec.models.registry import LoadedModel

    from conftest import build_model

    tensors = load_file(str(_weights(head_dir)))
    if variant == "float16":
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(_weights(head_dir)))
    else:
        _weights(head_dir).unlink()
        torch.save(tensors, head_dir / "pytorch_model.bin")
    model = build_model(llama_config(layers=6), 0)
    lm = LoadedModel("tiny", model, None)
    head = load_feature_head("eagle3", lm, str(head_dir), log=tell)
    err = capsys.readouterr().err
    stored = "float16" if variant == "float16" else "bfloat16"
    assert f"(stored in {stored}) runs in float32" in err and head is not None


@pytest.mark.parametrize("where", ["prompt-file", "dataset"])
def test_text_inputs_that_are_not_utf8(where, tmp_path, capsys):
    bad = tmp_path / ("p.txt" if where == "prompt-file" else "d.jsonl")
    bad.write_bytes(b'{"prompt": "caf\xe9 \xff"}\n')
    argv = (["generate", "--prompt-file", str(bad)] if where == "prompt-file"
            else ["bench", "--dataset", f"jsonl:{bad}", "--json", str(tmp_path / "r.json")])
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "not UTF-8", "0xe9", "save it as UTF-8")
    assert not (tmp_path / "r.json").exists()


def _out_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    return {
        "bench --json under a file": (["bench", "--json", str(tmp_path / "afile" / "r.json")], ["afile", "is a file"]),
        "bench --json is a directory": (["bench", "--json", str(tmp_path / "adir")], ["is a directory"]),
        "calibrate --png under a file": (["calibrate", "--png", str(tmp_path / "afile" / "c.png")], ["is a file"]),
        "train --out is a file": (["train", "--out", str(tmp_path / "afile")], ["is a file", "directory"]),
        "xmodal show --out is a directory": (["xmodal", "show", "--out", str(tmp_path / "adir")], ["is a directory"]),
        "xmodal eval --json under a file": (["xmodal", "eval", "--json", str(tmp_path / "afile" / "e.json")], ["is a file"]),
    }


@pytest.mark.parametrize("case", ["bench --json under a file", "bench --json is a directory", "calibrate --png under a file",
                                  "train --out is a file", "xmodal show --out is a directory",
                                  "xmodal eval --json under a file"])
def test_output_paths_checked_before_work(case, tmp_path, capsys):
    argv, needles = _out_cases(tmp_path)[case]
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = run_cli(capsys, "bench", "--json", str(ro / "r.json"))
        assert_one_line_error(code, err, "not writable")
    finally:
        ro.chmod(0o700)


def test_export_never_overwrites_a_head_or_mixes_files(head_dir, tmp_path, capsys):
    before = snapshot(head_dir)
    for out in (head_dir, head_dir / "inner"):
        code, err = run_cli(capsys, "export", "--head", str(head_dir), "--format", "vllm", "--out", str(out))
        assert_one_line_error(code, err, "never writes over a head")
    assert snapshot(head_dir) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "export", "--head", str(head_dir), "--format", "sglang", "--out", str(busy))
    assert_one_line_error(code, err, "non-empty", "--force")
    assert snapshot(busy) == {"notes.txt": b"mine"}
    assert run_cli(capsys, "export", "--head", str(head_dir), "--format", "sglang", "--out", str(busy), "--force")[0] == 0
    assert (busy / "config.json").exists() and not (busy / "notes.txt").exists()


@pytest.mark.parametrize("argv, needles", [
    (["generate", "--prompt", "hi", "--seed", str(2**64)], ["--seed", "2^63"]),
    (["generate", "--prompt", "hi", "--seed", "-1"], ["--seed"]),
    (["generate", "--prompt", "hi", "--temperature", "nan"], ["--temperature", "finite"]),
    (["generate", "--prompt", "hi", "--temperature", "inf"], ["--temperature", "finite"]),
    (["generate", "--prompt", "hi", "--top-p", "nan"], ["--top-p", "finite"]),
    (["generate", "--prompt", "hi", "--top-k", "-3"], ["--top-k", ">= 0"]),
    (["train", "--out", "/tmp/featspec-never", "--max-steps", "-1"], ["--max-steps", ">= 0"]),
    (["train", "--out", "/tmp/featspec-never", "--lr", "0"], ["--lr", "> 0"]),
    (["train", "--out", "/tmp/featspec-never", "--layer-ids", "2,x,4"], ["--layer-ids", "integers"]),
    (["bench", "--warmup", "-1"], ["--warmup", ">= 0"]),
    (["bench", "--limit", "ten"], ["--limit", "integer"]),
    (["xmodal", "eval", "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["xmodal", "adapters", "--limit", "0"], ["--limit", ">= 1"]),
    (["xmodal", "bench", "--spin-prob", "2"], ["--spin-prob", "[0, 1]"]),
    (["bench", "--methods", "hf,llamacpp", "--llama-cpp-draft", "many"], ["--llama-cpp-draft"]),
])
def test_numbers_out_of_range(argv, needles, capsys):
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *needles)
    assert not Path("/tmp/featspec-never").exists()


def test_target_that_is_a_head(head_dir, capsys):
    code, err = run_cli(capsys, "generate", "--prompt", "hi", "--target", str(head_dir), "--method", "ngram")
    assert_one_line_error(code, err, "draft head, not a model", "--head")


def test_ctrl_c_while_a_model_loads_or_the_cli_starts(monkeypatch, capsys):
    from featspec import cli
    from featspec.models import registry

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "load_model", interrupt)
    monkeypatch.setattr("featspec.models.load_model", interrupt)
    code, err = run_cli(capsys, "generate", "--prompt", "hi", "--method", "ngram")
    assert code == 130 and err.strip() == "featspec: interrupted"
    monkeypatch.setattr(cli, "build_parser", interrupt)
    code, err = run_cli(capsys, "generate", "--prompt", "hi")
    assert code == 130 and err.strip() == "featspec: interrupted"


def test_atomic_writer_leaves_nothing_on_failure(tmp_path):
    from featspec.io import atomic_write

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "r.json", boom)
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path)
