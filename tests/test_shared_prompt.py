"""The shared-prompt forward (training.sharedPrompt): one row per pair, prompt + real + generated, a 4D attention
mask keeping the answers apart. It must give the log-probs and gradients of the two-row concatenated forward."""

from __future__ import annotations

import random

import pytest
import torch

from spin_core.pairs import Pair, packed_tensors, pair_logps, pair_token_logps, shares_prompt


def random_pairs(vocab: int, n: int = 7, seed: int = 0) -> list[Pair]:
    rng = random.Random(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]

    # Lengths vary so that padding, and answers longer and shorter than each other, all occur.
    return [Pair(f"p{i}", 1, tokens(1, 12), tokens(1, 9), tokens(1, 14), False, None) for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_the_mask_keeps_the_answers_apart_and_positions_restart():
    pairs = [Pair("a", 1, [1, 2], [3, 4, 5], [6, 7], False, None)]
    packed = packed_tensors(pairs, pad_id=0)
    assert packed.ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert packed.positions[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    allowed = packed.allowed[0, 0]
    assert allowed[5].tolist() == [True, True, False, False, False, True, False]  # generated: prompt + itself
    assert allowed[6].tolist() == [True, True, False, False, False, True, True]
    assert allowed[4].tolist() == [True] * 5 + [False, False]  # real: prompt + itself, never the generated
    # The last prompt position predicts the first token of both answers.
    assert packed.real_at[0].tolist() == [1, 2, 3] and packed.real_targets[0].tolist() == [3, 4, 5]
    assert packed.gen_at[0].tolist() == [1, 5] and packed.gen_targets[0].tolist() == [6, 7]


def test_log_probs_match_the_two_row_forward(model):
    pairs = random_pairs(model.config.vocab_size)
    model.eval()
    with torch.no_grad():
        rows = pair_logps(model, pairs, pad_id=0, shared_prompt=False)
        shared = pair_logps(model, pairs, pad_id=0, shared_prompt=True)
        rows_tokens = pair_token_logps(model, pairs, pad_id=0, shared_prompt=False)
        shared_tokens = pair_token_logps(model, pairs, pad_id=0, shared_prompt=True)
    for a, b in zip(rows, shared, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a, b)
    assert torch.allclose(
        rows_tokens.real_tokens[rows_tokens.real_mask], shared_tokens.real_tokens[shared_tokens.real_mask], atol=1e-5
    )
    assert shared_tokens.real_mask.sum(-1).tolist() == [len(p.real) for p in pairs]


def test_gradients_match_the_two_row_forward(model):
    pairs = random_pairs(model.config.vocab_size, seed=1)
    model.train()
    grads = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        real, gen = pair_logps(model, pairs, pad_id=0, shared_prompt=shared)
        (real - 0.5 * gen).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_only_attention_that_takes_a_custom_mask_shares_the_prompt(model):
    assert shares_prompt(model) and not shares_prompt(model, enabled=False)
    original = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert not shares_prompt(model)
        # The two-row forward is what runs then, with the same numbers.
        pairs = random_pairs(model.config.vocab_size, n=2)
        model.config._attn_implementation = original
        with torch.no_grad():
            expected = pair_logps(model, pairs, pad_id=0, shared_prompt=False)
        model.config._attn_implementation = "flash_attention_2"

        class Engine(torch.nn.Module):  # what DeepSpeed's engine looks like from here: the model under .module
            def __init__(self, module):
                super().__init__()
                self.module = module

        assert not shares_prompt(Engine(model))
        model.config._attn_implementation = original
        assert shares_prompt(Engine(model))
        with torch.no_grad():
            assert torch.allclose(pair_logps(model, pairs, 0)[0], expected[0], atol=1e-4)
    finally:
        model.config._attn_implementation = original
