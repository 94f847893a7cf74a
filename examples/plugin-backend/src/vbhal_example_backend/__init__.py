"""An example vbhal backend: a device probe and one kernel, registered through an entry point.

A real backend would drive its own hardware; this one keeps tensors in host memory so that it runs
anywhere, which is what makes it useful as a template and in vbhal's own tests.
"""

from __future__ import annotations

import math

import torch

import vbhal
from vbhal.hookspecs import DeviceInfo, Kernel

DEVICE_KIND = "exampledev"


def attention(q, k, v, *, causal=False, scale=None, attn_mask=None, cu_seqlens=None, max_seqlen=None):
    """softmax(q k^T * scale + mask) v, written out (no SDPA), with grouped-query heads."""
    if cu_seqlens is not None:
        outs = []
        for i in range(cu_seqlens.numel() - 1):
            a, b = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
            o = attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                          causal=causal, scale=scale)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=-3)
        v = v.repeat_interleave(hq // hkv, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


class ExampleBackend:
    name = DEVICE_KIND

    @vbhal.hookimpl
    def vbhal_probe(self, registry):
        registry.add(DeviceInfo(name=f"{DEVICE_KIND}:0", kind=DEVICE_KIND, backend=self.name,
                                description="example device (tensors in host memory)", priority=60,
                                capabilities={"bf16": True}, torch_device=torch.device("cpu")))

    @vbhal.hookimpl
    def vbhal_get_kernel(self, name, device):
        if device.kind == DEVICE_KIND and name == "attention":
            return Kernel("attention", attention, self.name, "explicit softmax attention (example plug-in)")
        return None


plugin = ExampleBackend()
