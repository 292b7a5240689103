"""Synthetic tasks that a working language model learns in a few hundred CPU steps, and a backend comparison."""

import torch

import lmrt
from lmrt.models import IGNORE_INDEX

SEPARATOR = 1  # token ids 2.. are the payload


def copy_batch(batch: int, length: int, vocab: int, generator: torch.Generator):
    """Sequences `x SEP x` as (idx, targets) for next-token prediction, the loss on the second copy only: a model
    that predicts it has learned to look `length + 1` tokens back."""
    x = torch.randint(2, vocab, (batch, length), generator=generator)
    sequence = torch.cat([x, torch.full((batch, 1), SEPARATOR), x], dim=1)
    targets = sequence[:, 1:].clone()
    targets[:, : length] = IGNORE_INDEX
    return sequence[:, :-1], targets


def train(model, steps: int, lr: float, make_batch) -> list[float]:
    """AdamW on batches from `make_batch(generator)`; returns the losses."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        _, loss = model(*make_batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_backends_agree(model, inputs, rtol=1e-4, atol=1e-5):
    """The model's logits, loss and parameter gradients on the triton backend equal those on the torch backend.

    float32 throughout; each op matches the reference to within twice PyTorch's own float32 error, and a stack of
    layers compounds those differences, hence a relative 1e-4 rather than float32's default 1.3e-6."""
    results = {}
    for backend in ("torch", "triton"):
        model.zero_grad()
        with lmrt.backend(backend):
            logits, loss = model(*inputs)
            loss.backward()
        results[backend] = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results["triton"], results["torch"]
    torch.testing.assert_close(logits, ref_logits, rtol=rtol, atol=atol)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
