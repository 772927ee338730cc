"""The optimizers a run can train with (``--opt``): SGD (torch's, the seed's), and the large-batch ones, LARS and
LAMB, whose update is rescaled per layer by a *trust ratio*, ||w|| / ||update||, so that no layer moves by more
than a fraction of its own norm whatever the global rate (You et al.: LARS 2017, LAMB 2019).

Both follow their references: LARS as MLPerf's ResNet-50 reference uses it (mlcommons/training,
image_classification/tensorflow2/lars_optimizer.py: trust ratio ``eta * ||w|| / (||g|| + wd * ||w|| + eps)``,
the rate inside the momentum buffer, BatchNorm parameters and biases neither adapted nor decayed: its
``skip_list = ['batch_normalization', 'bias']``); LAMB as in You et al. 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 Minutes", Algorithm 2 (Adam's moments with bias correction, the weight decay added
to the update, then the trust ratio ||w|| / ||update||; the same exclusions, as Google's BERT LAMB
``exclude_from_layer_adaptation``). timm's timm/optim/lars.py and lamb.py are the same algorithms (timm's LARS
keeps the rate outside the momentum buffer and its LAMB clips the global gradient norm to 1 by default: neither
is done here).

How they run: each group's update is a handful of ``torch._foreach_*`` calls over all its tensors (multi-tensor
kernels on CUDA; the multiplications by a per-layer scale, one 0-dim tensor per layer, take torch's per-tensor
path), the per-layer norms are stacked into one tensor and the trust ratios computed on it with ``torch.where``
for the zero cases (a zero weight or update keeps ratio 1). Nothing is read back to the host, and there is no
Python branch on a tensor's value, so a step queues its kernels without a sync and traces under torch.compile
(checked by hand on the CPU, torch 2.13: ``torch.compile(opt.step, fullgraph=True)`` with the aot_eager and
inductor backends gives eager's weights; like torch's own optimizers, a rate that is a Python float compiles once
per value; rectrain's --compile compiles the model, not the step). What a step costs on a GPU against SGD is not
measured yet. The state (momentum buffers; moments and the step count) is tensors per parameter in
``self.state``: ``state_dict`` saves it and ``load_state_dict`` puts it back on the parameter's device exactly,
so a resumed run continues bit for bit. The rate is read from the group each step
(``set_lr`` writes it), so the schedule drives these as it drives SGD. Parameters must share one device and
dtype (one model's fp32 weights), as the stacked norms need.
"""

from __future__ import annotations

import torch

from rectrain.model import param_groups

__all__ = ["OPTIMIZERS", "Lars", "Lamb", "build_optimizer"]

OPTIMIZERS = ("sgd", "lars", "lamb")
LARS_EPS, LAMB_EPS = 0.0, 1e-6  # MLPerf's --lars_epsilon=0; You et al.'s and timm's LAMB epsilon


def _with_grads(optimizer: torch.optim.Optimizer, group: dict, init) -> tuple[list, list, list[dict]]:
    """(params, grads, states) of ``group``'s parameters that have a gradient; ``init(p)`` fills a new state.
    A branch on whether a gradient exists, not on any value: fine for torch.compile, as torch's own optimizers."""
    params, grads, states = [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{type(optimizer).__name__} does not support sparse gradients")
        state = optimizer.state[p]
        if not state:
            state.update(init(p))
        params.append(p)
        grads.append(p.grad)
        states.append(state)
    return params, grads, states


def _trust_ratios(w_norms: list[torch.Tensor], u_norms: list[torch.Tensor], eta: float = 1.0,
                  extra: float = 0.0, eps: float = 0.0) -> torch.Tensor:
    """(P,) ``eta * ||w|| / (||u|| + extra * ||w|| + eps)`` per tensor, 1 where ||w|| or ||u|| is 0 (a
    zero-initialised layer, or one without gradient this step, moves by the plain rate): both references' rule."""
    w, u = torch.stack(w_norms), torch.stack(u_norms)
    return torch.where((w > 0) & (u > 0), eta * w / (u + extra * w + eps), 1.0)


class _LayerwiseOptimizer(torch.optim.Optimizer):
    """What LARS and LAMB share: a step over each group's parameters that have a gradient, their state created on
    first use by ``_init_state`` and updated together by ``_update`` (a few foreach calls per group)."""

    @staticmethod
    def _init_state(p: torch.Tensor) -> dict:
        raise NotImplementedError

    @staticmethod
    def _update(group: dict, params: list, grads: list, states: list[dict]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, states = _with_grads(self, group, self._init_state)
            if params:
                self._update(group, params, grads, states)
        return loss


class Lars(_LayerwiseOptimizer):
    """LARS as MLPerf's ResNet-50 reference: per parameter tensor (a layer's weight),

        d = lr * trust * (g + wd * w),   trust = eta * ||w|| / (||g|| + wd * ||w|| + eps)  (1 if a norm is 0)
        buf = momentum * buf + d
        w -= buf                     (nesterov: w -= momentum * buf + d)

    The rate sits inside the momentum buffer (the reference's ``mom_t = mom * m - grad * scaled_lr``), unlike
    torch's SGD and timm's LARS: with a rate that changes every step the two differ. Groups with
    ``trust_ratio=False`` (BatchNorm parameters and biases: ``build_optimizer``) take plain momentum steps,
    ``d = lr * (g + wd * w)``, and get no weight decay from ``build_optimizer``. The buffer starts at zero, as the
    reference's slot does, so the first step is ``d``.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, eps: float = LARS_EPS, nesterov: bool = False, trust_ratio: bool = True):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0 or eps < 0:
            raise ValueError(f"bad LARS settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"eta={eta}, eps={eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      nesterov=nesterov, trust_ratio=trust_ratio))

    @staticmethod
    def _init_state(p: torch.Tensor) -> dict:
        return {"momentum_buffer": torch.zeros_like(p)}

    @staticmethod
    def _update(group: dict, params: list, grads: list, states: list[dict]) -> None:
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        bufs = [s["momentum_buffer"] for s in states]
        # g + wd * w, in new tensors (p.grad is left as the backward pass wrote it)
        d = torch._foreach_add(grads, params, alpha=wd) if wd else torch._foreach_mul(grads, 1.0)
        if group["trust_ratio"]:
            trust = _trust_ratios(torch._foreach_norm(params), torch._foreach_norm(grads), group["eta"], wd,
                                  group["eps"])
            torch._foreach_mul_(d, list((trust * lr).unbind(0)))  # one 0-dim device tensor per parameter
        else:
            torch._foreach_mul_(d, lr)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d)
        if group["nesterov"]:
            torch._foreach_add_(d, bufs, alpha=momentum)
            torch._foreach_sub_(params, d)
        else:
            torch._foreach_sub_(params, bufs)


class Lamb(_LayerwiseOptimizer):
    """LAMB (You et al. 2019, Algorithm 2): per parameter tensor, at step t (counted from 1),

        m = b1 * m + (1 - b1) * g,   v = b2 * v + (1 - b2) * g^2
        r = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * w
        w -= lr * trust * r,         trust = ||w|| / ||r||  (1 if a norm is 0)

    Groups with ``trust_ratio=False`` (BatchNorm parameters and biases) take the step without the ratio (and get no
    weight decay from ``build_optimizer``). The step count is a float32 tensor per parameter on its device
    (``step_count``: exact to 2^24 steps), so the bias corrections are computed there, with no host sync and no
    recompilation per step under torch.compile (torch's Adam keeps its ``step`` as a tensor for the same reason;
    the name differs because ``load_state_dict`` leaves a ``step`` on the CPU).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = LAMB_EPS,
                 weight_decay: float = 0.0, trust_ratio: bool = True):
        if lr < 0 or not all(0 <= b < 1 for b in betas) or eps < 0 or weight_decay < 0:
            raise ValueError(f"bad LAMB settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      trust_ratio=trust_ratio))

    @staticmethod
    def _init_state(p: torch.Tensor) -> dict:
        return {"step_count": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    @staticmethod
    def _update(group: dict, params: list, grads: list, states: list[dict]) -> None:
        (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
        counts = [s["step_count"] for s in states]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(counts, 1.0)
        torch._foreach_lerp_(m, grads, 1 - b1)                 # m = b1 m + (1 - b1) g
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)  # v = b2 v + (1 - b2) g^2
        t = torch.stack(counts)
        bc1, bc2_sqrt = 1 - b1 ** t, (1 - b2 ** t).sqrt()       # (P,) on the device
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, list(bc2_sqrt.unbind(0)))
        torch._foreach_add_(denom, eps)
        r = torch._foreach_div(m, list(bc1.unbind(0)))
        torch._foreach_div_(r, denom)
        if wd:
            torch._foreach_add_(r, params, alpha=wd)
        if group["trust_ratio"]:
            trust = _trust_ratios(torch._foreach_norm(params), torch._foreach_norm(r))
            torch._foreach_mul_(r, list((trust * -lr).unbind(0)))
            torch._foreach_add_(params, r)
        else:
            torch._foreach_add_(params, r, alpha=-lr)


def build_optimizer(model: torch.nn.Module, opt: str = "sgd", *, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, nesterov: bool = False, lars_eta: float = 0.001,
                    lamb_betas: tuple[float, float] = (0.9, 0.999), opt_eps: float | None = None,
                    sgd: dict | None = None) -> torch.optim.Optimizer:
    """``opt`` over ``model``'s parameters in ``param_groups``' two groups: the decayed weights, and the BatchNorm
    parameters and biases (no weight decay; for LARS and LAMB no trust ratio either), chosen by module type.
    ``sgd``: extra ``torch.optim.SGD`` arguments (``foreach``/``fused``, for a benchmark)."""
    decayed, excluded = param_groups(model, weight_decay)  # [decayed, no-decay], in that order
    if opt == "sgd":
        return torch.optim.SGD([decayed, excluded], lr=lr, momentum=momentum, nesterov=nesterov, **(sgd or {}))
    groups = [dict(decayed, trust_ratio=True), dict(excluded, trust_ratio=False)]
    if opt == "lars":
        return Lars(groups, lr=lr, momentum=momentum, eta=lars_eta, nesterov=nesterov,
                    eps=LARS_EPS if opt_eps is None else opt_eps)
    if opt == "lamb":
        return Lamb(groups, lr=lr, betas=lamb_betas, eps=LAMB_EPS if opt_eps is None else opt_eps)
    raise ValueError(f"opt must be one of {', '.join(OPTIMIZERS)}, got {opt!r}")
