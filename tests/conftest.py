"""Shared fixtures: tiny random-weight causal LMs built from configs (no hub, no downloads).

Weights use a larger initializer_range than the HF default so logits are well separated: with the
default 0.02 every logit of a tiny model sits near 0 and greedy argmax ties become float-noise coin
flips, which would make token-exactness tests flaky for reasons unrelated to featspec.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# CI must be reproducible: property tests draw the same examples on every run
settings.register_profile("featspec", derandomize=True)
settings.load_profile("featspec")
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

TINY_VOCAB = 96
GEMMA_WINDOW = 8


def llama_config(vocab: int = TINY_VOCAB, hidden: int = 48, layers: int = 2, attn: str = "sdpa", **kw) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=kw.pop("initializer_range", 0.25),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **kw,
    )
    cfg._attn_implementation = attn
    return cfg


def gemma3_config(
    vocab: int = TINY_VOCAB,
    hidden: int = 48,
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention"),
    window: int = GEMMA_WINDOW,
    attn: str = "sdpa",
    **kw,
) -> Gemma3TextConfig:
    cfg = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=len(layer_types),
        layer_types=list(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        query_pre_attn_scalar=hidden // 4,
        sliding_window=window,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        initializer_range=kw.pop("initializer_range", 0.25),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )
    cfg._attn_implementation = attn
    return cfg


def build_model(cfg, seed: int) -> torch.nn.Module:
    """A random-weight fp32 causal LM in eval mode, reproducible from `seed`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=cfg._attn_implementation)
    model.eval()
    model.requires_grad_(False)
    # greedy reference runs must not pick up sampling defaults from a generation config
    model.generation_config.do_sample = False
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with a second busy process on a 2-core box, 2 torch
    threads make each tiny forward ~100x slower (spin-waiting), so tiny-model modules use this."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def llama_model() -> torch.nn.Module:
    return build_model(llama_config(), seed=0)


@pytest.fixture(scope="session")
def llama_draft_model() -> torch.nn.Module:
    """A different (smaller) random LLaMA with the same vocabulary: a draft model that is often wrong."""
    return build_model(llama_config(hidden=32, layers=1), seed=1)


@pytest.fixture(scope="session")
def gemma_model() -> torch.nn.Module:
    return build_model(gemma3_config(), seed=2)


@pytest.fixture(scope="session")
def gemma_eager_model() -> torch.nn.Module:
    """Same weights as gemma_model, eager attention (a different mask-consumption path in HF)."""
    return build_model(gemma3_config(attn="eager"), seed=2)


@pytest.fixture(scope="session")
def gemma_draft_model() -> torch.nn.Module:
    return build_model(gemma3_config(hidden=32, layer_types=("sliding_attention",)), seed=3)


@pytest.fixture(scope="session")
def tiny_models(llama_model, llama_draft_model, gemma_model, gemma_eager_model, gemma_draft_model):
    """name -> (target model, separate draft model of the same vocabulary)."""
    return {
        "llama": (llama_model, llama_draft_model),
        "gemma3": (gemma_model, gemma_draft_model),
        "gemma3-eager": (gemma_eager_model, gemma_draft_model),
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """`featspec xmodal prepare --tiny`: cut-down target and drafter trained for a few steps (about 10 s)."""
    from featspec.cli import main

    out = tmp_path_factory.mktemp("xmodal")
    assert main(["xmodal", "prepare", "--tiny", "--out", str(out)]) == 0
    return out
