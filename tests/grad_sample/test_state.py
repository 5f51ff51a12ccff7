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
