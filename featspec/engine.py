"""SpeculativeGenerator: the single draft -> verify -> commit loop that serves every drafter."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from featspec.errors import FeatspecError
from featspec.models.target import TargetModel
from featspec.protocol import DraftContext, Drafter, StepFeedback, StepGuard
from featspec.sampling import SamplingConfig, process_logits, select_token
from featspec.tree import DraftTree
from featspec.verify import verify_greedy, verify_sampling


@dataclass
class StepStats:
    tree_size: int  # nodes verified, root included
    accepted: int  # draft tokens accepted (bonus excluded)
    committed: int  # tokens this step added to the output (accepted + bonus, after stop truncation)
    draft_s: float
    verify_s: float
    book_s: float  # acceptance, cache compaction, drafter update, stop checks
    tree_depth: int = 0  # deepest draft node (0 = no draft)
    plain: str = ""  # why the guard ran this step without drafts ("" = drafted): predicted | measured | measure


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    stop_reason: str  # eos | stop_string | max_new_tokens | context_length
    prefill_s: float
    total_s: float
    steps: list[StepStats] = field(default_factory=list)

    @property
    def verify_forwards(self) -> int:
        return len(self.steps)

    @property
    def drafted_steps(self) -> list[StepStats]:
        return [s for s in self.steps if not s.plain]

    @property
    def plain_steps(self) -> int:
        """Steps the guard ran without drafts (speculation measured or predicted slower than plain decoding)."""
        return sum(1 for s in self.steps if s.plain)

    @property
    def tau(self) -> float | None:
        """Committed tokens per verification forward of a drafted step (bonus included, prefill excluded;
        the guard's plain steps are left out: they say nothing about the drafter)."""
        steps = self.drafted_steps
        return sum(s.committed for s in steps) / len(steps) if steps else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.total_s if self.total_s > 0 else 0.0


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SpeculativeGenerator:
    """Runs one drafter against one target; lossless for greedy and sampled decoding.

    With a `Guard`, steps that speculation would make slower run without drafts (the root alone), and the
    drafter still observes them, so its state stays in sync for the next probe. The guard lives as long as
    the generator: what it measured on one prompt carries over to the next."""

    def __init__(self, target: TargetModel, drafter: Drafter, eos_ids: list[int], tokenizer=None,
                 guard: StepGuard | None = None):
        self.target = target
        self.drafter = drafter
        self.eos_ids = set(eos_ids)
        self.tokenizer = tokenizer
        self.guard = guard

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int = 0,
        stop_strings: tuple[str, ...] = (),
        on_token: Callable[[int], None] | None = None,
        prefill_inputs: dict | None = None,
    ) -> GenerationResult:
        """Generate after `prompt_ids`; `prefill_inputs` (e.g. pixel values) go to the target's prefill only."""
        if max_new_tokens < 1:
            raise FeatspecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt_ids:
            raise FeatspecError("empty prompt: pass at least one token of text")
        if len(prompt_ids) >= self.target.max_length:
            raise FeatspecError(
                f"prompt has {len(prompt_ids)} tokens but the context window is {self.target.max_length}: shorten the prompt"
            )
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        device = self.target.device
        generator = None if sampling.greedy else torch.Generator(device=device).manual_seed(seed)
        wants_hidden = self.drafter.wants_hidden

        t0 = _clock(device)
        self.drafter.begin(prompt_ids)  # a drafter may start work (its own prefill) that overlaps the target's
        try:
            pre = self.target.prefill(prompt_ids, hidden=wants_hidden, extra=prefill_inputs)
        except BaseException:
            self.drafter.cancel()  # stop (join) whatever `begin` started before the error leaves generate
            raise
        first = select_token(pre.logits[-1], sampling, generator)
        self.drafter.start(prompt_ids, pre)
        prefill_s = _clock(device) - t0

        tokens = list(prompt_ids)
        result = GenerationResult(list(prompt_ids), [], "max_new_tokens", prefill_s, 0.0)
        stop = self._append(result, tokens, [first], max_new_tokens, stop_strings, on_token)
        proposed_at: float | None = None  # when the drafter's last proposal ended (None: the last step had none)
        while stop is None:
            t1 = _clock(device)
            room = min(max_new_tokens - len(result.new_ids), self.target.max_length - self.target.length) - 1
            drafted = self.guard is None or self.guard.drafting()
            if drafted:
                ctx = DraftContext(tokens, max_depth=room, sampling=sampling, generator=generator,
                                   since_proposal_s=None if proposed_at is None else t1 - proposed_at)
                tree = self.drafter.propose(ctx).truncated(room)
            else:
                tree = DraftTree.root(tokens[-1])
            t2 = _clock(device)
            out = self.target.verify(tree, hidden=wants_hidden)
            t3 = _clock(device)
            if sampling.greedy:
                path, bonus = verify_greedy(tree, out.logits)
            else:
                path, bonus = verify_sampling(tree, process_logits(out.logits, sampling), generator)
            self.target.commit(path)
            self.drafter.observe(StepFeedback(tree, path, bonus, out, proposed=drafted))
            new = [tree.tokens[i] for i in path[1:]] + [bonus]
            before = len(result.new_ids)
            stop = self._append(result, tokens, new, max_new_tokens, stop_strings, on_token)
            t4 = _clock(device)
            proposed_at = t2 if drafted else None
            step = StepStats(len(tree), len(path) - 1, len(result.new_ids) - before, t2 - t1, t3 - t2, t4 - t3,
                             tree.max_depth(), "" if drafted else self.guard.reason)
            result.steps.append(step)
            if self.guard is not None:
                self.guard.record(drafted, step.committed, t4 - t1)
        result.stop_reason = stop
        result.total_s = _clock(device) - t0
        return result

    def _append(self, result, tokens, new, max_new_tokens, stop_strings, on_token) -> str | None:
        """Add tokens one by one, streaming them; return why generation stops, or None to go on."""
        for tok in new:
            result.new_ids.append(tok)
            tokens.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in self.eos_ids:
                return "eos"
            if stop_strings:
                tail = self.tokenizer.decode(result.new_ids[-64:])
                if any(s in tail for s in stop_strings):
                    return "stop_string"
            if len(result.new_ids) >= max_new_tokens:
                return "max_new_tokens"
            if len(tokens) >= self.target.max_length:
                return "context_length"
        return None
