"""Attention math: the SHD squeeze and its losses as pure functions on tensors (shd, lean), the capture
of q/k/v through transformers' AttentionInterface (capture), the other loss parts (losses, fused_logits,
balance) and the peer methods (relations: MiniLMv2; baselines: projector, score mean). Modules here
import only torch, transformers' attention hooks, shdcli.errors, shdcli.distributed and each other.
"""
