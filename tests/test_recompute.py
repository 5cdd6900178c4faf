"""recompute.py: the reentrant checkpoint both backends' memory tiers use. Its gradients must be plain
autograd's: for a layer whose inputs need a gradient (and a tensor keyword that does), and for one whose
inputs do not but whose own weights do, like a motion LoRA before any other trainable layer (the anchor);
with tensor and tuple outputs (autograd tracks a Function's flat tensor outputs only)."""

import torch

from i2vedit_core.recompute import recompute


def grads(checkpointed, inputs_need_grad, as_tuple):
    weight = torch.randn(5, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def layer(x, emb=None, scale=1.0):  # `weight` is the layer's own, not an input (as a LoRA's)
        h = torch.nn.functional.dropout(torch.tanh(x @ weight) * scale + emb, 0.3, training=True)
        return (h, h * 2) if as_tuple else h

    source = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), requires_grad=inputs_need_grad)
    emb = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), requires_grad=inputs_need_grad)
    torch.manual_seed(7)  # the dropout mask: the recomputation must draw it again
    out = (recompute(layer, source * 1.5, emb=emb, scale=2.0) if checkpointed
           else layer(source * 1.5, emb=emb, scale=2.0))
    loss = (out[0] + out[1]).pow(2).sum() if as_tuple else out.pow(2).sum()
    loss.backward()
    return [t.grad for t in (weight, emb, source) if t.grad is not None]


def test_gradients_are_plain_autograds():
    for inputs_need_grad in (True, False):
        for as_tuple in (False, True):
            plain, recomputed = grads(False, inputs_need_grad, as_tuple), grads(True, inputs_need_grad, as_tuple)
            assert len(plain) == len(recomputed) == (3 if inputs_need_grad else 1)
            for a, b in zip(plain, recomputed):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_layer_without_trainable_weights_or_grad_inputs_just_runs():
    calls = []
    x = torch.randn(2, 3)
    out = recompute(lambda t: calls.append(torch.is_grad_enabled()) or t * 2, x, holds_trainable=False)
    assert calls == [True] and out.grad_fn is None and torch.equal(out, x * 2)


def test_nested_outputs_are_refused():
    """autograd tracks a Function's top-level tensors only: a nested output would silently train nothing."""
    import pytest

    x = torch.randn(2, 3, requires_grad=True)
    for nested in (lambda t: (t * 2, [t]), lambda t: {"sample": t * 2}):
        with pytest.raises(TypeError, match="flat tuple"):
            recompute(nested, x)
