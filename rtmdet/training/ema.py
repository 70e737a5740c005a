"""Exponential moving average of a model's weights (mmdet ExpMomentumEMA), foreach-updated."""
import copy
import math

import torch


class ModelEMA:
    """Exponential moving average of all float parameters and buffers.

    Update k (k = 0, 1, ...): k = 0 copies; otherwise with
    m = (1 - momentum) * exp(-(1 + k) / gamma) + momentum:  avg = (1 - m) * avg + m * x.
    Integer buffers (BN's num_batches_tracked) are copied. One update is three `torch._foreach_*`
    calls over tensor lists bound on the first update (after any `.to()` of the model), so it
    costs a few kernel launches, not two per tensor; on the CPU the arithmetic is the same
    per-tensor mul_/add_ as a plain loop (bitwise equal).
    """

    def __init__(self, model, momentum=0.0002, gamma=2000.0):
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum, self.gamma, self.steps = momentum, gamma, 0
        self._bound = None

    def momentum_at(self, k):
        return (1 - self.momentum) * math.exp(-(1 + k) / self.gamma) + self.momentum

    def _bind(self, model):
        src = dict(unwrap(model).named_parameters())
        src.update(unwrap(model).named_buffers())
        avg = dict(self.module.named_parameters())
        avg.update(self.module.named_buffers())
        if set(src) != set(avg):
            raise ValueError("ModelEMA: the model's parameters and buffers differ from the EMA's")
        floats = [k for k in avg if avg[k].dtype.is_floating_point]
        ints = [k for k in avg if not avg[k].dtype.is_floating_point]
        for k in floats:
            if src[k].dtype != avg[k].dtype:
                raise ValueError(f"ModelEMA: {k} is {src[k].dtype} in the model, {avg[k].dtype} here")
        self._bound = (id(model), [avg[k] for k in floats], [src[k] for k in floats],
                       [avg[k] for k in ints], [src[k] for k in ints])

    @torch.no_grad()
    def update(self, model):
        if self._bound is None or self._bound[0] != id(model):
            self._bind(model)
        _, avg_f, src_f, avg_i, src_i = self._bound
        if avg_i:
            torch._foreach_copy_(avg_i, src_i)
        if self.steps == 0:
            torch._foreach_copy_(avg_f, src_f)
        else:
            m = self.momentum_at(self.steps)
            torch._foreach_mul_(avg_f, 1 - m)
            torch._foreach_add_(avg_f, src_f, alpha=m)
        self.steps += 1

    def state_dict(self):
        return {"module": self.module.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.steps = int(state["steps"])


def unwrap(model):
    """The RTMDet inside DDP / the loss wrapper / torch.compile."""
    model = getattr(model, "module", model)       # DDP
    model = getattr(model, "model", model)        # LossModule
    return getattr(model, "_orig_mod", model)     # torch.compile
