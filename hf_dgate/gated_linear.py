"""Gates applied to a Linear's weight instead of its activations, at no extra activation memory.

Scaling output feature i of a Linear by s_out[i] and input feature j by s_in[j] is the same as using the weight
W * s_out[:, None] * s_in[None, :] (and bias * s_out). An activation hook would keep the unscaled activation
alive for the gate's gradient, one extra activation per gated site; this autograd function saves only what a
plain Linear saves (its input) and recomputes the scaled weight in the backward pass:

    dL/dW'   = g^T x                       (the usual weight gradient)
    dL/dW    = dL/dW' * s_out s_in^T
    dL/ds_out = sum_j dL/dW'_ij W_ij s_in_j + (sum_t g_t) * b
    dL/ds_in  = sum_i dL/dW'_ij W_ij s_out_i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled(weight: torch.Tensor, s_out: torch.Tensor | None, s_in: torch.Tensor | None) -> torch.Tensor:
    w = weight
    if s_out is not None:
        w = w * s_out.to(w.dtype).unsqueeze(1)
    if s_in is not None:
        w = w * s_in.to(w.dtype).unsqueeze(0)
    return w


class GatedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, s_out, s_in, transposed: bool):
        # `transposed`: transformers' Conv1D keeps the weight as (in, out)
        w = weight.t() if transposed else weight
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc = x.to(dtype)
        wc = _scaled(w, s_out, s_in).to(dtype)
        bc = None
        if bias is not None:
            bc = (bias * s_out.to(bias.dtype) if s_out is not None else bias).to(dtype)
        with torch.autocast(device, enabled=False):
            y = F.linear(xc, wc, bc)
        ctx.save_for_backward(xc, weight, bias, s_out, s_in)
        ctx.transposed, ctx.x_dtype = transposed, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, weight, bias, s_out, s_in = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight
        dtype = xc.dtype
        g = grad.to(dtype)
        grad_x = grad_w = grad_b = grad_s_out = grad_s_in = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _scaled(w, s_out, s_in).to(dtype)).to(ctx.x_dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]), xc.reshape(-1, xc.shape[-1])
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        gw_scaled = (g2.t() @ x2).float() if need_w else None  # dL/dW', (out, in)
        if ctx.needs_input_grad[1]:
            gw = _scaled(gw_scaled, s_out, s_in)
            grad_w = (gw.t() if ctx.transposed else gw).to(weight.dtype)
        gb_scaled = g2.sum(0).float() if bias is not None else None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = (gb_scaled * s_out.float() if s_out is not None else gb_scaled).to(bias.dtype)
        if s_out is not None and ctx.needs_input_grad[3]:
            prod = gw_scaled * w.float()
            if s_in is not None:
                prod = prod * s_in.float().unsqueeze(0)
            grad_s_out = prod.sum(1)
            if bias is not None:
                grad_s_out = grad_s_out + gb_scaled * bias.float()
            grad_s_out = grad_s_out.to(s_out.dtype)
        if s_in is not None and ctx.needs_input_grad[4]:
            prod = gw_scaled * w.float()
            if s_out is not None:
                prod = prod * s_out.float().unsqueeze(1)
            grad_s_in = prod.sum(0).to(s_in.dtype)
        return grad_x, grad_w, grad_b, grad_s_out, grad_s_in, None


def gated_linear(x, weight, bias, s_out=None, s_in=None, transposed: bool = False) -> torch.Tensor:
    """`F.linear(x, W * s_out[:, None] * s_in[None, :], b * s_out)` without keeping extra activations."""
    return GatedLinearFunction.apply(x, weight, bias, s_out, s_in, transposed)
