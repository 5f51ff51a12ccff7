import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from tests.reference import assert_matches_reference, engine_chunk
from veil.grad_sample.rules.base import Call, rule_for
from veil.grad_sample.rules.embedding import EmbeddingScatterGrads



def tanh_loss(y, i):
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
    return (torch.tanh(y) * w).sum()


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 4),
    T=st.one_of(st.just(None), st.integers(1, 5)),
    V=st.integers(1, 6),
    D=st.integers(1, 4),
    padding_idx=st.one_of(st.just(None), st.integers(-1, 0)),
    scale_grad_by_freq=st.booleans(),
    batch_first=st.booleans(),
    calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_brute_force(B, T, V, D, padding_idx, scale_grad_by_freq, batch_first, calls, seed):
    torch.manual_seed(seed)
    emb = nn.Embedding(V, D, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, ids):
            y = self.emb(ids)
            if calls == 2:  # the same ids again plus shifted ones: repeats across calls
                y = y + self.emb(ids) * self.emb((ids + 1) % V)
            return y

    shape = (B,) if T is None else ((B, T) if batch_first else (T, B))
    ids = torch.randint(0, V, shape)  # small V: ids repeat within a sample
    assert_matches_reference(Net(), (ids,), tanh_loss, B, batch_first=batch_first or T is None)


class Bags(nn.Module):
    """Padded bags [B, Lmax] with lengths [B] -> EmbeddingBag called with 1-D input and offsets."""

    def __init__(self, bag: nn.EmbeddingBag, calls: int):
        super().__init__()
        self.bag, self.calls = bag, calls

    def forward(self, ids, lengths, psw):
        keep = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
        flat, flat_w = ids[keep], None if psw is None else psw[keep]
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        if not self.bag.include_last_offset:
            offsets = offsets[:-1]
        y = self.bag(flat, offsets, per_sample_weights=flat_w)
        if self.calls == 2:  # other ids in the same bags
            y = y * self.bag((flat + 1) % self.bag.num_embeddings, offsets, per_sample_weights=flat_w)
        return y


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 4),
    L=st.integers(1, 5),
    V=st.integers(1, 6),
    D=st.integers(1, 3),
    mode=st.sampled_from(["sum", "mean"]),
    weighted=st.booleans(),
    offsets=st.booleans(),
    include_last_offset=st.booleans(),
    padding_idx=st.one_of(st.just(None), st.integers(-1, 0)),
    calls=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_embedding_bag_matches_brute_force(B, L, V, D, mode, weighted, offsets, include_last_offset, padding_idx, calls, seed):
    torch.manual_seed(seed)
    weighted = weighted and mode == "sum"
    bag = nn.EmbeddingBag(
        V, D, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset and offsets
    )
    ids = torch.randint(0, V, (B, L))
    psw = torch.randn(B, L) if weighted else None
    if offsets:  # ragged bags, empty ones included; functorch cannot vmap over offsets
        lengths = torch.randint(0, L + 1, (B,))
        assert_matches_reference(
            Bags(bag, calls), (ids, lengths, psw), tanh_loss, B, modes=("auto", "ghost", "instantiate")
        )
    else:

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.bag = bag

            def forward(self, ids, psw):  # psw positional: the functorch fallback vmaps positional args only
                y = self.bag(ids, None, psw)
                return y if calls == 1 else y * self.bag(ids.flip(1), None, psw)

        assert_matches_reference(Net(), (ids, psw), tanh_loss, B)


@pytest.mark.parametrize("module", [nn.Embedding(7, 3), nn.EmbeddingBag(7, 3, mode="sum")])
def test_auto_uses_scatter_and_instantiate_is_dense(module):
    module = module.double()  # built at collection time, outside the float64 fixture
    rule = rule_for(module)
    ids = torch.tensor([[1, 2, 1], [0, 6, 6]])
    y = module(ids)
    call = Call(ctx=rule.capture(module, (ids,), {}, True), grad=torch.randn_like(y))
    auto = rule.layer_grads(module, [call], ["weight"], "auto")
    dense = rule.layer_grads(module, [call], ["weight"], "instantiate")
    assert isinstance(auto, EmbeddingScatterGrads)
    assert dense.per_sample()["weight"].shape == (2, 7, 3)
    torch.testing.assert_close(auto.norms_sq["weight"], dense.norms_sq["weight"], rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Embedding(5, 2, max_norm=1.0), "max_norm"),
        (nn.Embedding(5, 2, sparse=True), "sparse"),
        (nn.EmbeddingBag(5, 2, max_norm=1.0), "max_norm"),
        (nn.EmbeddingBag(5, 2, sparse=True), "sparse"),
        (nn.EmbeddingBag(5, 2, mode="max"), "mode='max'"),
        (nn.EmbeddingBag(5, 2, scale_grad_by_freq=True), "scale_grad_by_freq"),
    ],
)
def test_unsupported_options_raise(module, match):
    with pytest.raises(ValueError, match=match):
        engine_chunk(module, (torch.tensor([[1, 2], [3, 4]]),), lambda y: y.sum(), "auto")


def test_in_place_clipped_sum_equals_the_returned_one():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3, padding_idx=0)
    ids = torch.tensor([[1, 2, 1], [0, 6, 6]])
    rule = rule_for(emb)
    call = Call(ctx=rule.capture(emb, (ids,), {}, True), grad=torch.randn(2, 3, 3))
    lg = rule.layer_grads(emb, [call], ["weight"], "auto")
    c = torch.tensor([0.5, 2.0])
    out = torch.ones(7, 3)
    lg.add_clipped_sum_("weight", c, out)
    torch.testing.assert_close(out, 1 + lg.clipped_sum({"weight": c})["weight"], rtol=1e-12, atol=0)
