import torch

from veil.grad_sample import state


def test_shared_product_reuses_only_identical_contents():
    calls = []

    def gram(t):
        calls.append(1)
        return t @ t.t()

    a = torch.randn(3, 4)
    with state.shared_products():
        first = state.shared_product("gram", a, gram)
        assert state.shared_product("gram", a.view(3, 4), gram) is first  # a view of the same memory
        assert len(calls) == 1
        state.shared_product("gram", a.t(), gram)  # other strides: other contents
        assert len(calls) == 2
        a.mul_(2)  # modified in place: the version changes
        torch.testing.assert_close(state.shared_product("gram", a, gram), a @ a.t())
        assert len(calls) == 3
    state.shared_product("gram", a, gram)  # outside the context nothing is kept
    state.shared_product("gram", a, gram)
    assert len(calls) == 5


def test_shared_products_keep_only_the_most_recent():
    """Only the last few products stay cached (a layer's Gram matrices are not held to the end of the
    backward); one in use keeps its place."""
    calls = []

    def gram(t):
        calls.append(1)
        return t @ t.t()

    ts = [torch.randn(3, 4) for _ in range(state._KEEP_PRODUCTS + 1)]
    with state.shared_products():
        for t in ts[:-1]:
            state.shared_product("gram", t, gram)
        state.shared_product("gram", ts[0], gram)  # a hit: ts[0] becomes the most recent
        state.shared_product("gram", ts[-1], gram)  # evicts ts[1], the oldest
        assert len(calls) == len(ts)
        state.shared_product("gram", ts[0], gram)
        assert len(calls) == len(ts)
        state.shared_product("gram", ts[1], gram)
        assert len(calls) == len(ts) + 1
