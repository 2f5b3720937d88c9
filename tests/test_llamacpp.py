"""llama.cpp beside featspec: head export with the layer ids llama.cpp reads, bench methods, server lifecycle.

The export test runs llama.cpp's real converter (the pinned source, which `make test` fetches); the server and
bench tests run a stand-in llama-server (a small HTTP script speaking the same endpoints) so they need no
12-minute build: `make check-llamacpp` runs the real one.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from featspec.cli import main
from featspec.errors import FeatspecError
from featspec.heads.eagle3 import Eagle3Head, default_layer_ids
from featspec.heads.layers import HeadConfig
from featspec.llamacpp.convert import check_eagle3_metadata, converter_config, read_eagle3_metadata
from featspec.llamacpp.server import LlamaServer
from featspec.llamacpp.source import fetch
from featspec.models import registry

from test_cli import assert_one_line_error, run_cli

FAKE_SERVER = r'''
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
drafting = "-md" in args
n_max = int(args[args.index("--spec-draft-n-max") + 1]) if "--spec-draft-n-max" in args else 3
counters = {"spec_decode_num_drafts_total": 0, "spec_decode_num_accepted_tokens_total": 0,
            "spec_decode_num_draft_tokens_total": 0}

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def reply(self, body, kind="application/json"):
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        if self.path == "/health":
            self.reply("{}")
        else:
            self.reply("".join(f"llamacpp:{k} {v}\n" for k, v in counters.items()), "text/plain")
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n, p = body["n_predict"], body["prompt"]
        tokens = [(sum(p) * 7 + i * 13) % 90 + 3 for i in range(n)]  # deterministic, the same with or without drafts
        if drafting:
            steps = (n + 1) // 2
            counters["spec_decode_num_drafts_total"] += steps
            counters["spec_decode_num_accepted_tokens_total"] += n - steps
            counters["spec_decode_num_draft_tokens_total"] += steps * n_max
        self.reply(json.dumps({"tokens": tokens, "stop_type": "limit", "timings": {"predicted_ms": 1.0 * n}}))

HTTPServer(("127.0.0.1", port), H).serve_forever()
'''

FAKE_CONVERTER = r'''
import sys
out = sys.argv[sys.argv.index("--outfile") + 1]
open(out, "wb").write(b"GGUF fake target")
'''


@pytest.fixture()
def fake_tree(tmp_path):
    """A llama.cpp tree whose llama-server is the stand-in above and whose converter writes a placeholder."""
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    server = tree / "build" / "bin" / "llama-server"
    server.write_text(f"#!{sys.executable}\n{FAKE_SERVER}")
    server.chmod(server.stat().st_mode | stat.S_IEXEC)
    return tree


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_converter_gets_the_head_layer_ids_unshifted():
    """llama.cpp reads target layer id k as the input of layer k (= HF hidden_states[k], a featspec layer id);
    its converter copies eagle_aux_hidden_state_layer_ids as is, so featspec hands it the head's ids."""
    cfg = {"hidden_size": 64, "eagle_aux_hidden_state_layer_ids": [0, 2, 6], "featspec": {"layer_ids": [1, 3, 7]}}
    out = converter_config(cfg, [1, 3, 7])
    assert out["eagle_aux_hidden_state_layer_ids"] == [1, 3, 7] and "featspec" not in out
    assert converter_config({}, list(default_layer_ids(30)))["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]


def test_metadata_check_catches_a_misread_head():
    good = {"architecture": "eagle3", "target_layers": [1, 3, 7], "target_hidden_size": 64, "tensors": dict.fromkeys(range(14))}
    assert check_eagle3_metadata(good, [1, 3, 7], 64) == []
    shifted = {**good, "target_layers": [0, 2, 6]}
    assert any("target_layers [0, 2, 6]" in p for p in check_eagle3_metadata(shifted, [1, 3, 7], 64))
    assert check_eagle3_metadata({**good, "architecture": "llama"}, [1, 3, 7], 64)
    assert check_eagle3_metadata({**good, "tensors": {}}, [1, 3, 7], 64)


@pytest.fixture(scope="module")
def tiny_target_dir(tmp_path_factory):
    """A random 8-layer target (hidden 64) with SmolLM2's tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = registry.resolve_source("smollm2-135m")
    out = tmp_path_factory.mktemp("tiny-target")
    tok = AutoTokenizer.from_pretrained(src)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, cfg.to_dict()


@pytest.mark.real
def test_export_gguf_writes_non_default_layer_ids(tiny_target_dir, tmp_path, capsys, monkeypatch):
    """A head on layers (1, 3, 7) of an 8-layer target (default would be 2, 4, 5) exports through llama.cpp's
    real converter with exactly those ids, the eagle3 architecture and the 14 tensors llama.cpp loads."""
    from featspec.heads.checkpoint import save_head

    tdir, cfg = tiny_target_dir
    hc = HeadConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=cfg["vocab_size"], draft_vocab_size=32,
                    target_hidden_size=64, target_num_layers=8)
    head = Eagle3Head(hc, (1, 3, 7))
    head.set_vocab(torch.arange(32) * 5)
    save_head(head, tmp_path / "head")
    out = tmp_path / "head.gguf"
    tree = fetch()  # the pinned source `make test` fetched; the target's GGUF goes to a throw-away cache
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path / "cache"))
    code = main(["export", "--head", str(tmp_path / "head"), "--format", "gguf", "--target", str(tdir), "--out", str(out),
                 "--llama-cpp", str(tree)])
    assert code == 0, capsys.readouterr().err
    meta = read_eagle3_metadata(out)
    assert meta["architecture"] == "eagle3"
    assert meta["target_layers"] == [1, 3, 7]
    assert meta["target_hidden_size"] == 64
    assert len(meta["tensors"]) == 14 and meta["tensors"]["fc.weight"] == [3 * 64, 64]
    printed = capsys.readouterr().out
    assert "target layers [1, 3, 7]" in printed and f"-md {out} --spec-type draft-eagle3" in printed
    assert list((tmp_path / "cache" / "llamacpp" / "gguf").glob("*.gguf"))  # the target, converted for that command


def test_export_gguf_bad_out_is_one_line(tmp_path, capsys):
    code, err = run_cli(capsys, "export", "--head", "featspec/assets/heads/smollm2-135m/eagle3", "--format", "gguf",
                        "--out", str(tmp_path / "dir"))
    assert_one_line_error(code, err, "head.gguf")
    code, err = run_cli(capsys, "export", "--head", "featspec/assets/heads/smollm2-135m/eagle3", "--format", "vllm",
                        "--out", str(tmp_path / "x"), "--target", "smollm2-135m")
    assert_one_line_error(code, err, "--format gguf")


def test_bench_without_llama_cpp_says_how_to_get_it(tmp_path, capsys):
    code, err = run_cli(capsys, "bench", "--methods", "hf,llamacpp", "--llama-cpp", str(tmp_path / "nowhere"),
                        "--json", str(tmp_path / "r.json"))
    assert_one_line_error(code, err, "make llamacpp")
    code, err = run_cli(capsys, "bench", "--methods", "hf,llamacpp-eagle3", "--llama-cpp-draft", "0,2",
                        "--llama-cpp", str(tmp_path))
    assert code == 2 and "Traceback" not in err


def test_server_stops_on_error_and_interrupt(fake_tree):
    """The server process is gone after the with-block, whether it ended normally, by an error or by Ctrl-C."""
    pids = []
    for exc in (None, RuntimeError("boom"), KeyboardInterrupt()):
        try:
            with LlamaServer(fake_tree, Path("model.gguf"), threads=1) as s:
                pids.append(s.proc.pid)
                c = s.complete([5, 6, 7], 4)
                assert len(c.ids) == 4 and c.seconds > 0
                if exc is not None:
                    raise exc
        except (RuntimeError, KeyboardInterrupt):
            pass
        assert not _alive(pids[-1])


def test_server_that_dies_is_one_error(tmp_path):
    tree = tmp_path / "t"
    (tree / "build" / "bin").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("")
    bad = tree / "build" / "bin" / "llama-server"
    bad.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    bad.chmod(0o755)
    with pytest.raises(FeatspecError, match="failed to load model"):
        LlamaServer(tree, Path("m.gguf")).start()


@pytest.mark.real
def test_bench_runs_llamacpp_methods_and_stops_servers(fake_tree, tmp_path, capsys, monkeypatch):
    """llamacpp and llamacpp-eagle3 beside hf in one run: same prompts, speed vs llamacpp, exactness of the
    drafted run against llamacpp, tau from llama.cpp's counters, flags in the JSON; no server outlives it."""
    src = registry.resolve_source("smollm2-135m")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    target = tmp_path / "target"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(target)
    tok.save_pretrained(target)
    monkeypatch.setenv("FEATSPEC_CACHE", str(tmp_path / "cache"))
    from featspec.llamacpp import bench as lbench

    monkeypatch.setattr(lbench.LlamaCppSession, "head_file", lambda self: Path("head.gguf"))
    started: list[int] = []
    real_start = LlamaServer.start

    def spy(self):
        real_start(self)
        started.append(self.proc.pid)

    monkeypatch.setattr(LlamaServer, "start", spy)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Say hello."}) + "\n" + json.dumps({"prompt": "Count to three."}) + "\n")
    out = tmp_path / "r.json"
    code = main(["bench", "--target", str(target), "--dataset", f"jsonl:{data}", "--dtype", "float32", "--max-new-tokens",
                 "6", "--methods", "hf,llamacpp,llamacpp-eagle3", "--llama-cpp", str(fake_tree), "--llama-cpp-draft", "2,0.5",
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    m = report["methods"]
    assert m["llamacpp"]["speedup_vs_llamacpp"] == pytest.approx(1.0)
    assert m["llamacpp-eagle3"]["exact_match"] == 1.0  # against llamacpp: the same engine
    assert m["llamacpp-eagle3"]["agreement_with_hf"] == 0.0  # the stand-in does not compute the model
    assert m["llamacpp-eagle3"]["tau"] == pytest.approx(2.0)  # 6 tokens in 3 drafted steps per prompt
    assert m["llamacpp"]["tau"] is None and m["llamacpp"]["new_tokens"] == 12
    lc = report["config"]["llamacpp"]
    assert lc["draft_flags"] == {"n_max": 2, "n_min": 0, "p_min": 0.5}
    assert "--spec-draft-n-max 2" in lc["command"] and "-md head.gguf" in lc["command"]
    assert "| llamacpp-eagle3 |" in out.with_suffix(".md").read_text()
    assert len(started) == 2 and not any(_alive(p) for p in started)

    # Ctrl-C in the middle of the run: the servers still stop
    started.clear()
    from featspec.llamacpp.bench import LlamaCppMethod

    monkeypatch.setattr(LlamaCppMethod, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    code = main(["bench", "--target", str(target), "--dataset", f"jsonl:{data}", "--dtype", "float32", "--max-new-tokens",
                 "6", "--methods", "llamacpp,hf", "--llama-cpp", str(fake_tree), "--json", str(out)])
    assert code == 130 and started and not any(_alive(p) for p in started)
