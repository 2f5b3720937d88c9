"""A llama-server process on 127.0.0.1 that featspec starts, talks to, and always stops.

Prompts go in as token ids (rendered by the same HF chat template featspec uses), so both engines see the
same input; llama.cpp adds no BOS to a token-id prompt. The server is stopped on every exit path: `close()` in
a `finally`, Ctrl-C included, and on Linux the kernel kills it if featspec itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from featspec.errors import FeatspecError
from featspec.llamacpp.source import binary

START_TIMEOUT_S = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Completion:
    """One request's answer: generated ids, client-side wall seconds, and llama.cpp's own counters."""

    ids: list[int]
    seconds: float
    stop: str
    timings: dict = field(default_factory=dict)
    drafts: int = 0  # verification steps that checked a draft
    accepted: int = 0  # draft tokens accepted over those steps
    drafted: int = 0  # draft tokens proposed


class LlamaServer:
    """`llama-server -m MODEL [-md HEAD --spec-type draft-eagle3]` on a free port; use as a context manager."""

    def __init__(self, tree: Path, model: Path, head: Path | None = None, threads: int = 2, ctx: int = 4096,
                 draft: dict | None = None, extra: tuple[str, ...] = ()):
        self.tree, self.model, self.head = Path(tree), Path(model), head
        self.port = _free_port()
        self.args = [str(binary(tree, "llama-server")), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-t", str(threads), "-c", str(ctx), "-np", "1", "--metrics", "--no-webui", "-ngl", "0"]
        if head is not None:
            self.args += ["-md", str(head), "--spec-type", "draft-eagle3", "-ngld", "0"]
            if draft:
                self.args += ["--spec-draft-n-max", str(draft["n_max"]), "--spec-draft-n-min", str(draft.get("n_min", 0)),
                              "--spec-draft-p-min", f"{draft['p_min']:g}"]
        self.args += list(extra)
        self.proc: subprocess.Popen | None = None
        self.log = None  # the server's output, a temp file while it runs

    def command(self) -> str:
        """The command line, with the port left for the user to choose."""
        args = [a for a in self.args if a not in ("--metrics",)]
        i = args.index("--port")
        del args[i:i + 2]
        return " ".join(["llama-server"] + args[1:])

    def __enter__(self) -> "LlamaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="featspec-llama-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FeatspecError(f"llama-server exited while loading {self.model.name}"
                                    f"{' with ' + self.head.name if self.head else ''}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.close()
        raise FeatspecError(f"llama-server did not become ready in {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 3) -> str:
        if self.log is None:
            return "(not started)"
        text = Path(self.log.name).read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(no output)"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.log is not None:
            self.log.close()
            Path(self.log.name).unlink(missing_ok=True)
            self.log = None

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise FeatspecError(f"llama-server refused a request ({exc.code}): {exc.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise FeatspecError(f"llama-server stopped answering ({exc}): {self.log_tail()}") from None

    def metrics(self) -> dict[str, float]:
        """llama.cpp's Prometheus counters (draft steps and accepted tokens among them)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"llamacpp:(\w+)\s+([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def complete(self, ids: list[int], n_predict: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> Completion:
        """Generate from token ids (draft flags are the server's: this llama-server ignores per-request ones)."""
        body = {"prompt": list(ids), "n_predict": n_predict, "cache_prompt": False, "return_tokens": True,
                "seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": 0.0,
                "repeat_penalty": 1.0, "stream": False}
        if temperature <= 0:
            body.update(temperature=0.0, top_k=1)
        before = self.metrics() if self.head is not None else {}
        t0 = time.perf_counter()
        out = self._post("/completion", body)
        seconds = time.perf_counter() - t0
        after = self.metrics() if self.head is not None else {}

        def delta(key: str) -> int:
            return int(after.get(key, 0) - before.get(key, 0))

        ids_out = list(out.get("tokens") or [])
        stop = out.get("stop_type") or ("eos" if out.get("stopped_eos") else "limit")
        return Completion(ids_out, seconds, stop, out.get("timings") or {}, drafts=delta("spec_decode_num_drafts_total"),
                          accepted=delta("spec_decode_num_accepted_tokens_total"),
                          drafted=delta("spec_decode_num_draft_tokens_total"))
