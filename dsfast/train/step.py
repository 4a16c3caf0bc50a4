"""One optimizer step over the global batch, with exact gradients of the batch-coupled losses.

The pairwise-similarity losses couple every sample of the *global* batch. Two schemes give
the gradient of the global-batch loss regardless of ranks and micro-batches:

* one micro-batch per rank: forward with grad, all-gather the x0 features (the gradient of
  the loss, computed identically on every rank, flows back to the rank's own slice), add
  ``world * L_pair`` (the data-parallel all-reduce averages over ranks);
* several micro-batches (gradient accumulation): pass 1 forwards every micro-batch without
  grad to get the source and adapted x0, gathers them across ranks, takes the pairwise loss
  and ``G = dL_pair / d x0_adapted`` of the full batch; pass 2 re-forwards each micro-batch
  with grad and back-propagates ``per-sample loss + accum * world * <G_own, x0>``. The same
  timesteps/noise are drawn in both passes (they are functions of (seed, step, sample)).

Backward hooks of the engine average over ranks and divide by the accumulation steps, hence
the ``accum * world`` factors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import distributed as D


class NonFiniteLoss(FloatingPointError):
    pass


@dataclass
class MicroOut:
    loss: torch.Tensor  # scalar: this micro-batch's per-sample terms (means over the micro-batch)
    terms: dict = field(default_factory=dict)  # name -> scalar tensor, for logging
    adapted: torch.Tensor | None = None  # (m, ...) features entering the pairwise loss (with grad)
    source: torch.Tensor | None = None  # (m, ...) source features (no grad)


def _check(value: torch.Tensor, what: str, step: int) -> None:
    bad = not bool(torch.isfinite(value.detach()).all())
    if D.any_flag(bad):
        raise NonFiniteLoss(f"non-finite {what} at step {step}")


def _add_terms(acc: dict, terms: dict, scale: float) -> None:
    for k, v in terms.items():
        acc[k] = acc.get(k, 0.0) + float(v.detach()) * scale


def run_step(method, micro_batches, backward, *, step: int) -> dict[str, float]:
    """Forward/backward all micro-batches of this rank for one optimizer step.

    ``method.forward(mb, need_source)`` -> :class:`MicroOut`; ``method.pairwise(src, ada, step)``
    -> ``(loss, terms)`` on the gathered global batch, or ``method.has_pairwise`` False.
    ``backward(loss)`` back-propagates one micro-batch (and steps the engine).
    Returns the logged terms, averaged over micro-batches and ranks.
    """
    accum, world = len(micro_batches), D.world()
    logs: dict[str, float] = {}
    if not method.has_pairwise:
        for mb in micro_batches:
            out = method.forward(mb, need_source=False)
            _check(out.loss, "loss", step)
            _add_terms(logs, {"loss": out.loss, **out.terms}, 1.0 / accum)
            backward(out.loss)
        return D.all_reduce_mean(logs)

    if accum == 1:
        out = method.forward(micro_batches[0], need_source=True)
        _check(out.adapted, "x0 prediction", step)
        _check(out.source, "source x0 prediction", step)
        src = D.all_gather_cat(out.source.detach())
        ada = D.gather_with_grad(out.adapted)
        pair, pair_terms = method.pairwise(src, ada, step)
        _check(out.loss + pair, "loss", step)
        backward(out.loss + world * pair)
        logs = {k: float(v.detach()) for k, v in out.terms.items()}
        logs["per_sample"] = float(out.loss.detach())
        logs = D.all_reduce_mean(logs)
        logs.update({k: float(v.detach()) for k, v in pair_terms.items()})
        logs["loss"] = logs.pop("per_sample") + float(pair.detach())
        return logs

    # Pass 1: features of every micro-batch without grad.
    with torch.no_grad():
        outs = [method.forward(mb, need_source=True) for mb in micro_batches]
        src_local = torch.cat([o.source for o in outs])
        ada_local = torch.cat([o.adapted for o in outs])
    _check(ada_local, "x0 prediction", step)
    _check(src_local, "source x0 prediction", step)
    sizes = [o.adapted.shape[0] for o in outs]
    del outs
    src_all = D.all_gather_cat(src_local)
    ada_all = D.all_gather_cat(ada_local).detach().requires_grad_(True)
    with torch.enable_grad():
        pair, pair_terms = method.pairwise(src_all, ada_all, step)
        (grad_all,) = torch.autograd.grad(pair, ada_all)
    _check(pair, "pairwise loss", step)
    n_local = ada_local.shape[0]
    r = D.rank()
    grad_own = grad_all[r * n_local:(r + 1) * n_local]
    del src_all, ada_all, grad_all, src_local, ada_local

    # Pass 2: re-forward each micro-batch with grad, back-propagate cached gradient + own terms.
    offset = 0
    per_sample = 0.0
    for mb, m in zip(micro_batches, sizes):
        out = method.forward(mb, need_source=False)
        g = grad_own[offset:offset + m].to(out.adapted.dtype)
        offset += m
        _check(out.loss, "loss", step)
        loss = out.loss + (accum * world) * (g * out.adapted).sum()
        _add_terms(logs, out.terms, 1.0 / accum)
        per_sample += float(out.loss.detach()) / accum
        backward(loss)
    logs["per_sample"] = per_sample
    logs = D.all_reduce_mean(logs)
    logs.update({k: float(v.detach()) for k, v in pair_terms.items()})
    logs["loss"] = logs.pop("per_sample") + float(pair.detach())
    return logs
