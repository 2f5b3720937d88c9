"""llama.cpp as bench methods beside HF and featspec: `llamacpp` (the target alone) and `llamacpp-eagle3`
(the target with the head as draft, at the flags that pay on this machine, or without the head when none do).

One `LlamaCppSession` per bench run converts the target and head once (cached), starts the servers, runs
the flag sweep on prompts outside the benchmarked ones, and stops every server in `close()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from featspec.errors import FeatspecError
from featspec.llamacpp.convert import cached_gguf, export_gguf, outtype, target_gguf
from featspec.llamacpp.flags import FlagChoice, cli_flags, cost_lines, explain, sweep, verify_costs
from featspec.llamacpp.server import LlamaServer
from featspec.llamacpp.source import resolve_tree, version
from featspec.models.registry import LoadedModel
from featspec.sampling import SamplingConfig

LLAMACPP_METHODS = ("llamacpp", "llamacpp-eagle3")


def target_dir(spec: str) -> Path:
    """The local HF directory of a target (an alias's cached safetensors, a directory, or a hub snapshot)."""
    from featspec.models.registry import resolve_source

    src = resolve_source(spec)
    if Path(src).is_dir():
        return Path(src)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src))
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same advice
        raise FeatspecError(f"could not fetch '{spec}' for llama.cpp ({type(exc).__name__}): pass a local directory") from None


def parse_draft(text: str) -> dict | None | str:
    """--llama-cpp-draft: 'auto' (sweep), 'none', or 'N_MAX[,P_MIN]'."""
    if text in ("auto", "none"):
        return text
    parts = text.split(",")
    try:
        n_max = int(parts[0])
        p_min = float(parts[1]) if len(parts) > 1 else 0.0
    except (ValueError, IndexError):
        raise FeatspecError(f"--llama-cpp-draft {text!r}: use auto, none, or N_MAX[,P_MIN] like 3,0.5") from None
    if n_max < 1 or not 0.0 <= p_min < 1.0 or len(parts) > 2:
        raise FeatspecError(f"--llama-cpp-draft {text!r}: N_MAX must be >= 1 and P_MIN in [0, 1)")
    return {"n_max": n_max, "n_min": 0, "p_min": p_min}


class LlamaCppSession:
    """The target (and head) in llama.cpp for one bench run; `close()` stops its servers."""

    def __init__(self, lm: LoadedModel, tree: str | None, head: str | None, draft: str = "auto",
                 tune_prompts: list[list[int]] | None = None, threads: int | None = None):
        self.lm = lm
        self.tree = resolve_tree(tree)
        self.dtype = str(lm.dtype).replace("torch.", "")
        outtype(self.dtype)
        self.head_spec = head
        self.draft = parse_draft(draft)
        self.tune_prompts = tune_prompts or []
        self.threads = threads or torch.get_num_threads()
        self.tdir = target_dir(lm.spec)
        self.model = target_gguf(self.tree, self.tdir, self.dtype)
        self.servers: dict[str, LlamaServer] = {}
        self.choice: FlagChoice | None = None
        self.head_gguf: Path | None = None

    def server(self, draft: dict | None) -> LlamaServer:
        """The target alone (draft None), or with the head at these draft flags."""
        key = "plain" if draft is None else cli_flags(draft)
        if key not in self.servers:
            s = self._new_server(draft)
            self.servers[key] = s  # registered before start, so close() stops a half-started server too
            s.start()
        return self.servers[key]

    def _new_server(self, draft: dict | None) -> LlamaServer:
        head = None if draft is None else self.head_file()
        return LlamaServer(self.tree, self.model, head, threads=self.threads, draft=draft)

    def head_file(self) -> Path:
        if self.head_gguf is None:
            from featspec.drafters import shipped_head
            from featspec.heads.checkpoint import resolve_head_dir

            src = resolve_head_dir(self.head_spec) if self.head_spec else shipped_head(self.lm.spec, "eagle3")
            self.head_gguf = cached_gguf(f"head-{src.name}", [src, self.tdir], outtype(self.dtype), self.tree,
                                         lambda out: export_gguf(str(src), self.tdir, self.tree, out, self.dtype))
        return self.head_gguf

    def flags(self) -> dict | None:
        """The draft flags `llamacpp-eagle3` runs with (None: without the head)."""
        if self.choice is None:
            if isinstance(self.draft, dict):
                self.choice = FlagChoice(self.draft, cli_flags(self.draft), 0.0, 0.0, given=True)
            elif self.draft == "none":
                self.choice = FlagChoice(None, "(no draft model)", 0.0, 0.0, given=True)
            else:
                if not self.tune_prompts:
                    raise FeatspecError("the llama.cpp flag sweep needs prompts outside the benchmarked ones")
                print(f"featspec: sweeping llama.cpp draft flags on {len(self.tune_prompts)} prompts", file=sys.stderr,
                      flush=True)
                self.choice = sweep(self.server(None), self._new_server, self.tune_prompts)
                explain(self.choice, verify_costs(self.tree, self.model, self.threads))
                print("featspec: " + self.choice.summary(), file=sys.stderr, flush=True)
                for line in cost_lines(self.choice.costs):
                    print("featspec: " + line, file=sys.stderr, flush=True)
        return self.choice.flags

    def command(self) -> str:
        """The llama-server command line a user runs to get `llamacpp-eagle3`'s speed."""
        return self._new_server(self.flags()).command()

    def report(self) -> dict:
        out = {"llama_cpp": version(self.tree), "target_gguf": str(self.model), "threads": self.threads}
        if self.choice is not None:
            out.update(head_gguf=str(self.head_gguf) if self.head_gguf else None, draft_flags=self.choice.flags,
                       command=self.command(), verdict=self.choice.summary(), sweep=self.choice.to_json())
        return out

    def close(self) -> None:
        for s in self.servers.values():
            s.close()
        self.servers.clear()


class LlamaCppMethod:
    """A bench method served by llama-server: same prompt ids, greedy or sampled by llama.cpp's sampler."""

    def __init__(self, name: str, session: LlamaCppSession, sampling: SamplingConfig):
        self.name, self.session, self.sampling = name, session, sampling
        self.server = session.server(session.flags() if name == "llamacpp-eagle3" else None)

    def run(self, prompt_ids: list[int], max_new_tokens: int, seed: int):
        from featspec.bench.methods import RunRecord

        s = self.sampling
        c = self.server.complete(prompt_ids, max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                 seed=seed)
        return RunRecord(c.ids, c.seconds, extra={"drafts": c.drafts, "accepted": c.accepted, "drafted": c.drafted})
