"""Layer-wise adaptive optimizers for large batches: LARS and LAMB.

Hand-written because no well-kept implementation fits: PyTorch ships neither; apex's FusedLAMB
and LARC need its CUDA extensions (and FusedLAMB has no bf16); timm's ``Lars``/``Lamb`` are pure
PyTorch but timm is a large dependency this project does not otherwise need, and its ``Lars``
keeps the momentum buffer before the learning rate (``buf = m*buf + trust*d; p -= lr*buf``), not in
the MLPerf reference's form below, which matters under a schedule that changes the LR every step.

Both follow the published update rules, per parameter tensor ``w`` with gradient ``g``, weight
decay ``wd`` and learning rate ``lr`` of its group. A group with ``adapt=False`` (BatchNorm and
bias parameters, which also get ``wd = 0``, unless ``--bn-weight-decay``) skips the trust ratio:

* LARS (You, Gitman, Ginsburg 2017, arXiv:1708.03888; the MLPerf ResNet-50 reference's
  ``lars_optimizer.py``): ``trust = eta*||w|| / (||g|| + wd*||w|| + eps)`` (1 when ``||w||`` or
  ``||g||`` is 0); ``v = m*v + lr*trust*(g + wd*w)``; ``w -= v`` (Nesterov: ``w -= m*v +
  lr*trust*(g + wd*w)``). ``trust_clip`` is LARC's clipping (apex, timm): ``trust`` becomes
  ``min(trust / lr, 1)``, so the layer's LR is ``min(eta*||w||/(...), lr)``.
* LAMB (You et al. 2019, arXiv:1904.00962, Algorithm 2, as NVIDIA's NVLAMB): optionally clip the
  global gradient norm to ``max_grad_norm``; Adam moments ``m``, ``v`` with bias correction;
  ``r = m_hat / (sqrt(v_hat) + eps)``; ``u = r + wd*w`` (decay decoupled from the moments);
  ``trust = ||w|| / ||u||`` (1 when either is 0; ``trust_clip``, LAMBC, caps it at 1);
  ``w -= lr*trust*u``.

Neither reads anything back to the host (the zero-norm guards are ``torch.where``), so a CUDA step
queues without a sync. Under fp16 ``GradScaler.step`` unscales the gradients before calling
``step`` (these optimizers take no ``grad_scale``), so the trust ratio and the clipping see true
gradients, and a step whose gradients overflowed is skipped whole (LAMB's step count included).
"""
from __future__ import annotations

import torch


def _trust(numerator: torch.Tensor, w_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
    """``numerator``, or 1 where the weight or the direction has norm 0 (a fresh zero-initialised
    layer, a layer without gradient this step)."""
    one = torch.ones_like(numerator)
    return torch.where((w_norm > 0) & (d_norm > 0), numerator, one)


def _loss_of(closure):
    """``Optimizer.step``'s optional closure re-evaluates the loss with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Lars(torch.optim.Optimizer):
    """LARS with momentum in the MLPerf reference's form (see the module docstring)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, nesterov: bool = False,
                 trust_clip: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, trust_clip=trust_clip, adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _loss_of(closure)
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                direction = grad.add(p, alpha=wd) if wd else grad
                if group["adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust = _trust(group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"]),
                                   w_norm, g_norm)
                    if group["trust_clip"] and lr > 0:
                        trust = (trust / lr).clamp(max=1.0)
                    scaled = direction * (trust * lr)
                else:
                    scaled = direction * lr
                state = self.state[p]
                if momentum:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = scaled.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(scaled)
                    buffer = state["momentum_buffer"]
                    update = buffer * momentum + scaled if group["nesterov"] else buffer
                else:
                    update = scaled
                p.sub_(update)
        return loss


class Lamb(torch.optim.Optimizer):
    """LAMB with decoupled weight decay and optional global gradient-norm clipping (see the
    module docstring). ``max_grad_norm`` 0 = no clipping."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, max_grad_norm: float = 0.0, trust_clip: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_clip=trust_clip,
                        adapt=True)
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _clip_divisor(self) -> torch.Tensor | None:
        """max(1, ||all gradients|| / max_grad_norm), a device tensor (no sync)."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not self.max_grad_norm or not grads:
            return None
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        return (total / self.max_grad_norm).clamp(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = _loss_of(closure)
        divisor = self._clip_divisor()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if divisor is None else p.grad / divisor
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"].item()  # a CPU tensor (as torch.optim.Adam keeps it): no device sync
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                corrected_avg = exp_avg / (1 - beta1 ** step)
                denominator = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = corrected_avg.div_(denominator)
                if wd:
                    update.add_(p, alpha=wd)
                if group["adapt"]:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    trust = _trust(w_norm / u_norm, w_norm, u_norm)
                    if group["trust_clip"]:
                        trust = trust.clamp(max=1.0)
                    update.mul_(trust)
                p.sub_(update, alpha=lr)
        return loss
