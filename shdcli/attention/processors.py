"""Capture queries, keys and values through diffusers' attention processors (the analogue of capture.py).

A diffusers `Attention` module (DiT's `attn1`, the self-attention of every BasicTransformerBlock) hands its
work to `attn.processor(attn, hidden_states, ...)`; `attn.set_processor(p)` swaps it. `CaptureProcessor`
computes exactly what diffusers' default `AttnProcessor2_0` computes (projections, optional group/spatial
norm and q/k norms, SDPA, output projection and dropout, residual, rescale) and, when the active
AttentionRecorder (capture.py) asks for its layer, records q, k, v as [B, H, N, d] with the module's
scaling. Maps are rebuilt from the record by the lean SHD loss exactly as for transformers models:
A_h = softmax(q_h k_h^T * scale), no mask (a DiT attends over every patch token).

Covered: any diffusers model whose attention runs through `attention_processor.Attention` with a
processor (DiTTransformer2DModel; PixArt and the other Transformer2DModel users share the block). Layers
are numbered by the order `enable` receives their attention modules (the model's blocks, in order).
diffusers is imported by the caller (tasks/diffusion.py); this module needs only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shdcli.attention.capture import active_recorder


class CaptureProcessor:
    """AttnProcessor2_0 that also records q/k/v of layer `layer` for the active recorder."""

    def __init__(self, layer: int) -> None:
        self.layer = layer

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # [B, C, H, W] -> [B, H W, C]
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, keys, _ = source.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])  # [B, H, N, M]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # [B, N, H d]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # [B, M, H d]
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, M, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scale = float(attn.scale)
        recorder = active_recorder()
        if recorder is not None:
            if attention_mask is not None and self.layer in recorder.layers:
                raise ValueError("CaptureProcessor: a masked diffusers attention layer cannot be recorded")
            recorder.record(attn, query, key, value, None, scale, False, layer=self.layer)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False, scale=scale)  # [B, H, N, d]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # [B, N, H d]
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def enable(attentions: list[nn.Module]) -> None:
    """Give each diffusers Attention module (layer i = its index in the list) the capture processor.
    Outputs are unchanged: the processor is the default computation. Idempotent."""
    for i, attn in enumerate(attentions):
        if not isinstance(attn.processor, CaptureProcessor) or attn.processor.layer != i:
            attn.set_processor(CaptureProcessor(i))
