"""flora.gpt's vocabulary blocks (``vocab_chunks``) and the lean preset's choice of them.

- a chunked model draws the same initial values as the whole one from the same seed, its
  embedding returns exactly the same rows and its logits the same values (to matmul
  rounding); each block's gradient is the matching rows of the whole matrix's gradient;
- under the lean preset's step-in-backward, at most one parameter holds a gradient at a
  time, and the largest is one block: exact bytes, smaller than the whole head's;
- ``lean_config`` picks ceil(vocab / (4 n_embd)) blocks; bad ``vocab_chunks`` are refused.
- ``tie_embeddings``: the head is the embedding's parameters (one, or one per block), the
  chunked tied model is the whole tied one split, without an accumulator the tied gradient
  arrives once with both uses summed; under the lean preset the head's block gradients are
  taken in as they are formed (flora.accumulation.tied_use: the bf16 block-shaped tensors
  alive at once peak exactly as in the untied model, where plain autograd holds every
  block), and the lean planner counts the tied weight once and its gradients by that rule.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flora
import flora.gpt
from flora.gpt import GPT, SIZES, GPTConfig, lean_config
from flora.model_memory import lean_rows

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=103)


def _pair(chunks=4):
    torch.manual_seed(0)
    whole = GPT(CONFIG)
    torch.manual_seed(0)
    chunked = GPT(GPTConfig(**{**CONFIG.__dict__, "vocab_chunks": chunks}))
    return whole, chunked


def test_chunked_model_is_the_whole_model_split():
    whole, chunked = _pair()
    names = [n for n, _ in chunked.named_parameters()]
    assert names[:4] == [f"tok.weights.{i}" for i in range(4)]
    assert [w.shape[0] for w in chunked.tok.weights] == [26, 26, 26, 25]  # tensor_split
    assert torch.equal(torch.cat(list(chunked.tok.weights)), whole.tok.weight)
    assert torch.equal(torch.cat(list(chunked.head.weights)), whole.head.weight)
    for (n, a), (_, b) in zip(
        [(n, p) for n, p in whole.named_parameters() if n not in ("tok.weight", "head.weight")],
        [(n, p) for n, p in chunked.named_parameters() if ".weights." not in n],
        strict=True,
    ):
        assert torch.equal(a, b), n
    idx = torch.randint(103, (3, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(chunked.tok(idx), whole.tok(idx))  # every index, every block
    torch.testing.assert_close(chunked(idx), whole(idx), rtol=1e-6, atol=1e-6)
    y = torch.randint(103, (3, 12), generator=torch.Generator().manual_seed(2))
    whole(idx, y).backward()
    chunked(idx, y).backward()
    for name in ("tok", "head"):
        blocks = torch.cat([w.grad for w in getattr(chunked, name).weights])
        torch.testing.assert_close(blocks, getattr(whole, name).weight.grad, rtol=1e-5, atol=1e-7)


def _largest_live_gradient(model, accumulate=2):
    """Bytes of the .grad tensors alive whenever a gradient arrives, at most, over one
    lean cycle; the hooks run before the accumulator's, which steps and frees."""
    peak = [0]
    params = list(model.parameters())

    def look(_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak[0] = max(peak[0], live)

    for p in params:
        p.register_post_accumulate_grad_hook(look)
    setup = flora.lean_setup(model, accumulate=accumulate, rank=4, kappa=5)
    idx = torch.randint(103, (2, 13), generator=torch.Generator().manual_seed(3))
    for _ in range(accumulate):
        with setup.accumulator.micro_batch():
            (model(idx[:, :-1], idx[:, 1:]) / accumulate).backward()
    assert all(p.grad is None for p in params)
    setup.accumulator.remove()
    return peak[0]


def test_step_in_backward_holds_one_block_gradient_at_a_time():
    whole, chunked = _pair()
    block = 26 * 16 * 2  # the largest block, bf16
    assert _largest_live_gradient(chunked) == max(block, 4 * 16 * 16 * 2)  # or an MLP matrix
    assert _largest_live_gradient(whole) == 103 * 16 * 2  # the whole head


def test_lean_config_and_bad_vocab_chunks():
    assert lean_config(SIZES["gpt2"]).vocab_chunks == 17  # ceil(50257 / 3072)
    assert lean_config(SIZES["small"]).vocab_chunks == 1  # bytes: one matrix
    assert lean_config(CONFIG).vocab_chunks == 2
    with pytest.raises(ValueError, match="vocab_chunks"):
        GPTConfig(vocab_chunks=0)
    with pytest.raises(ValueError, match="vocab_chunks"):
        GPTConfig(vocab_size=8, vocab_chunks=9)
    with pytest.raises(TypeError, match="vocab_chunks"):
        GPTConfig(vocab_chunks=2.0)


def _tied(chunks):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CONFIG.__dict__, "vocab_chunks": chunks, "tie_embeddings": True}))


def test_tied_head_is_the_embedding_in_blocks_too():
    whole, chunked = _tied(1), _tied(4)
    assert whole.head.weight is whole.tok.weight
    assert all(h is t for h, t in zip(chunked.head.weights, chunked.tok.weights, strict=True))
    untied = sum(p.numel() for p in GPT(CONFIG).parameters())
    for model in (whole, chunked):
        assert sum(p.numel() for p in model.parameters()) == untied - 103 * 16
    assert torch.equal(torch.cat(list(chunked.tok.weights)), whole.tok.weight)
    assert 0.015 < whole.tok.weight.std().item() < 0.025  # GPT-2's N(0, 0.02)
    idx = torch.randint(103, (3, 12), generator=torch.Generator().manual_seed(1))
    y = torch.randint(103, (3, 12), generator=torch.Generator().manual_seed(2))
    whole(idx, y).backward()
    chunked(idx, y).backward()
    blocks = torch.cat([w.grad for w in chunked.tok.weights])
    torch.testing.assert_close(blocks, whole.tok.weight.grad, rtol=1e-5, atol=1e-7)


def test_tied_gradient_arrives_once_with_both_uses():
    tied = _tied(1)
    torch.manual_seed(0)
    untied = GPT(CONFIG)
    with torch.no_grad():
        for a, b in zip(tied.state_dict().values(), untied.state_dict().values(), strict=True):
            b.copy_(a)  # both heads hold the tied weight (it is in tied's state dict twice)
    seen = []
    tied.tok.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    idx = torch.randint(103, (3, 12), generator=torch.Generator().manual_seed(1))
    tied(idx, idx).backward()
    untied(idx, idx).backward()
    assert len(seen) == 1  # step-in-backward steps it once, with the whole gradient
    both = untied.tok.weight.grad + untied.head.weight.grad
    torch.testing.assert_close(seen[0], both, rtol=1e-5, atol=1e-7)


class _Live(TorchDispatchMode):
    """The peak bytes of bf16 tensors of the given shapes produced and alive at once (the
    vocabulary blocks' gradients), checked after every op."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.refs, self.peak = shapes, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (
                isinstance(t, torch.Tensor)
                and t.dtype == torch.bfloat16
                and tuple(t.shape) in self.shapes
                and t._base is None
            ):
                self.refs.append(weakref.ref(t))
        alive = {}
        for ref in self.refs:
            if (t := ref()) is not None:
                alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.peak = max(self.peak, sum(alive.values()))
        return out


def _block_gradient_peak(model):
    """The peak of :class:`_Live` over the first micro-batch's backward of a lean cycle
    (no step yet: only gradients and their transient copies are block-shaped)."""
    setup = flora.lean_setup(model, accumulate=2, rank=4, kappa=5)
    idx = torch.randint(103, (2, 13), generator=torch.Generator().manual_seed(3))
    live = _Live({tuple(w.shape) for w in model.tok.weights})
    with setup.accumulator.micro_batch():
        loss = model(idx[:, :-1], idx[:, 1:]) / 2
        with live:
            loss.backward()
    setup.accumulator.remove()
    return live.peak


def test_tied_head_gradients_are_not_held_until_the_embeddings_backward(monkeypatch):
    _, untied = _pair()
    routed = _block_gradient_peak(_tied(4).to(torch.bfloat16))
    assert routed == _block_gradient_peak(untied.to(torch.bfloat16))  # as if untied
    assert routed <= 2 * 26 * 16 * 2  # a block's gradient and autograd's copy of it
    monkeypatch.setattr(flora.gpt, "tied_use", lambda w: w)  # plain autograd: held
    assert _block_gradient_peak(_tied(4).to(torch.bfloat16)) >= 103 * 16 * 2  # every block


def test_lean_planner_counts_a_tied_weight_once():
    with torch.device("meta"):
        tied = _tied(4).to(torch.bfloat16)
    rows = dict(lean_rows(tied, rank=4, kappa=5, accumulate=2))
    assert rows["parameters (bf16)"] == 2 * sum(p.numel() for p in tied.parameters())
    # routed apart (tied_use): the largest gradient, an MLP matrix (4 x 16 x 16, bf16)
    assert rows["gradients at their peak"] == 4 * 16 * 16 * 2
    # a model that does not route them: autograd holds the head's gradient of every block
    # until the embedding's backward: all blocks (103 x 16, bf16) plus the one being formed
    tied.routes_shared_gradients = False
    rows = dict(lean_rows(tied, rank=4, kappa=5, accumulate=2))
    assert rows["gradients at their peak"] == 103 * 16 * 2 + 26 * 16 * 2
    with torch.device("meta"):
        untied = GPT(GPTConfig(**{**CONFIG.__dict__, "vocab_chunks": 4})).to(torch.bfloat16)
    assert (
        dict(lean_rows(untied, rank=4, kappa=5, accumulate=2))["gradients at their peak"]
        == 4 * 16 * 16 * 2
    )  # an MLP matrix
    with pytest.raises(TypeError, match="tie_embeddings"):
        GPTConfig(tie_embeddings=1)
