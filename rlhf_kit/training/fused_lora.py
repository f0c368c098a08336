"""LoRA linear layers computed without PEFT's full-size temporaries.

PEFT computes an adapted linear layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. Besides the two thin
matmuls, that writes the rank-r product out at the layer's full output size, scales it in a second full-size pass and
adds it in a third; autograd's backward repeats full-size passes for the scale and for adding the two input
gradients. On a CPU at the PPO benchmark's 512x8 shape those element-wise passes were a fifth of the PPO update.

Here the scale is applied to the rank-r activations (r numbers per token instead of the output width) and the
low-rank product is accumulated into the base layer's output by an in-place ``addmm_``; the backward is written out
the same way (the input gradient of the adapter is accumulated into the base layer's). The result is the same
function with the same gradients, up to float rounding.

Only the plain case is fused: one active LoRA adapter (no DoRA or other variant, no bias on ``lora_B``), an
``nn.Linear`` base without hooks, no dropout, every tensor in one dtype and no autocast. Anything else (a 4-bit base,
float32 adapters on a bfloat16 base, mixed adapter batches, a disabled or merged adapter) runs PEFT's own forward,
decided on every call, so switching adapters or disabling them for the reference works as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn


class _LoRALinear(torch.autograd.Function):
    """``x W^T + b + scaling * (x A^T) B^T`` with the scale on the rank-r activations and the sum in place."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                scaling: float) -> Tensor:
        low_rank = (x.reshape(-1, x.shape[-1]) @ lora_a.t()).mul_(scaling)  # (N, r)
        out = F.linear(x, weight, bias)
        # Through a view, so the output itself is a fresh tensor (not a view made inside a Function, which autograd
        # would forbid modifying in place downstream).
        out.view(-1, out.shape[-1]).addmm_(low_rank, lora_b.t())
        ctx.save_for_backward(x, weight, lora_a, lora_b, low_rank)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        grad_low_rank = (grad_rows @ lora_b).mul_(ctx.scaling)  # (N, r), the scale included
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight).addmm_(grad_low_rank, lora_a).view(x.shape)
        grad_a = grad_low_rank.t() @ rows if ctx.needs_input_grad[3] else None
        grad_b = grad_rows.t() @ low_rank if ctx.needs_input_grad[4] else None
        # The base weight and bias are frozen: PEFT freezes them, and _fusable hands trainable ones to PEFT.
        return grad_x, None, None, grad_a, grad_b, None


def _plain_module(module: nn.Module) -> bool:
    """An ``nn.Linear`` itself (not a subclass such as a quantized or FSDP-wrapped layer) with no hooks to honour."""
    return (type(module) is nn.Linear and not module._forward_hooks and not module._forward_pre_hooks
            and not module._backward_hooks)


def _fusable(layer: LoraLinear, x: Tensor, args: tuple, kwargs: dict) -> str | None:
    """The adapter to fuse for this call, or None when PEFT's own forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base, lora_a, lora_b, dropout = layer.base_layer, layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if name in layer.lora_variant or lora_b.bias is not None or not (_plain_module(base) and _plain_module(lora_a)
                                                                      and _plain_module(lora_b)):
        return None
    if layer.training and not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0)):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    if not (x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return None
    return name


class FusedLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear``, computed by `_LoRALinear` whenever the call is one it covers."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        name = _fusable(self, x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return _LoRALinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name])


def fuse_lora(model: nn.Module) -> int:
    """Make every PEFT LoRA ``Linear`` in `model` a `FusedLoraLinear` (in place); returns how many layers.

    Only the class changes, not the weights or the state dict, so saving, copying and sharding see the same module.
    The choice between the fused computation and PEFT's forward is made on every call (see the module docstring),
    so this is safe on any LoRA model; `unfuse_lora` undoes it.
    """
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count


def unfuse_lora(model: nn.Module) -> None:
    """PEFT's own ``Linear`` class on every fused layer in `model` again."""
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            module.__class__ = LoraLinear
