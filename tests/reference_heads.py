"""Straightforward per-episode re-derivations of the registered heads, written from what the released code computes.

Each function takes ONE episode in the released code's layout (supports in any order with their episode
labels, queries, global class ids), reads the weights of the project's module, and recomputes logits
and loss with plain loops and the released operation order (e.g. CLIP-FSAR's text token appended
*after* the frames, prototypes grouped by ``unique(labels)``, a cell-by-cell OTAM). The tests compare
the project's batched heads with these in float64. Not part of the package.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def cos_sim(x: Tensor, y: Tensor, eps: float = 0.01) -> Tensor:
    """The released ``cos_sim``: ``<x, y> / (|x| |y| + eps)``, ``(..., n, D), (m, D) -> (..., n, m)``."""
    return (x @ y.transpose(-1, -2)) / (x.norm(dim=-1, keepdim=True) * y.norm(dim=-1).unsqueeze(-2) + eps)


def otam_cum_dist(d: Tensor, lbda: float) -> Tensor:
    """The released ``OTAM_cum_dist``: cell by cell on ``(A, B, L, M)``, a naive log-sum-exp soft-min."""
    d = F.pad(d, (1, 1), "constant", 0)  # (A, B, L, M+2)
    L, M2 = d.shape[-2], d.shape[-1]
    cum = [[None] * M2 for _ in range(L)]
    zero = torch.zeros_like(d[..., 0, 0])
    cum[0][0] = zero
    for m in range(1, M2):
        cum[0][m] = d[..., 0, m] + cum[0][m - 1]

    def smin(*xs: Tensor) -> Tensor:
        return -lbda * torch.log(sum(torch.exp(-x / lbda) for x in xs))

    for l in range(1, L):
        cum[l][0] = zero
        cum[l][1] = d[..., l, 1] + smin(cum[l - 1][0], cum[l - 1][1], cum[l][0])
        for m in range(2, M2 - 1):
            cum[l][m] = d[..., l, m] + smin(cum[l - 1][m - 1], cum[l][m - 1])
        cum[l][M2 - 1] = d[..., l, M2 - 1] + smin(cum[l - 1][M2 - 2], cum[l - 1][M2 - 1], cum[l][M2 - 2])
    return cum[L - 1][M2 - 1]


def _attention_qkv(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``PreNormattention_qkv(Attention_qkv)``: one LayerNorm for q, k and v; the residual adds the un-normed q."""
    h = layer.heads
    qn, kn, vn = layer.norm(q), layer.norm(k), layer.norm(v)
    Q, K, V = layer.to_q(qn), layer.to_k(kn), layer.to_v(vn)  # (b, n, h*d)
    b, n, hd = Q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], h, hd // h).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
    dots = split(Q) @ split(K).transpose(-1, -2) * (hd // h) ** -0.5
    out = dots.softmax(dim=-1) @ split(V)  # (b, h, n, d)
    out = out.permute(0, 2, 1, 3).reshape(b, n, hd)
    return layer.to_out(out) + q


def transformer_v1(layers, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The released ``Transformer_v1``: layer 0 on (q, k, v), later layers self-attention; FFN with residual, no norm."""
    x = _attention_qkv(layers[0], q, k, v)
    x = layers[0].ffn(x) + x
    for layer in layers[1:]:
        x = _attention_qkv(layer, x, x, x)
        x = layer.ffn(x) + x
    return x


def clip_fsar_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                      support_text: Tensor, class_text: Tensor | None = None, real_labels: Tensor | None = None,
                      batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_OTAM_CLIPFSAR.forward`` (training branch) and the training loop's loss for one episode.

    Args:
        model: the project's CLIPFSAR (its weights are read).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels.
        query: ``(Q, T, D)``; target_labels ``(Q,)``.
        support_text: ``(S, D)`` the class text of each support (``text_features_train[real_support_labels]``).
        class_text: ``(C, D)`` every train class's text (the video-text loss), or None.
        real_labels: ``(S+Q,)`` global class ids of [supports; queries] (with ``class_text``).
        batch_size: ``TRAIN.BATCH_SIZE`` the loss is divided by.

    Returns:
        logits ``(Q, N)`` and the loss (before the division by ``batch_size``, times 1: per episode).
    """
    o = model.options
    T = support.shape[1]
    layers = model.context2
    if class_text is not None:
        feats = torch.cat([support, query], dim=0).mean(1)
        class_logits = cos_sim(feats, class_text, o.cos_eps) * model.scale
    target = transformer_v1(layers, query, query, query)
    context_support = model.mid_layer(support_text.unsqueeze(1))  # (S, 1, D)
    unique = torch.unique(support_labels)
    if o.merge_before:
        support = torch.stack([support[support_labels == c].mean(0) for c in unique])
        context_support = torch.stack([context_support[support_labels == c].mean(0) for c in unique])
    seq = torch.cat([support, context_support], dim=1)  # the token after the frames
    sup = transformer_v1(layers, seq, seq, seq)[:, :T]
    if not o.merge_before:
        sup = torch.stack([sup[support_labels == c].mean(0) for c in unique])
    n_q, n_s = target.shape[0], sup.shape[0]
    frame_dists = 1 - cos_sim(target.reshape(-1, target.shape[-1]), sup.reshape(-1, sup.shape[-1]), o.cos_eps)
    dists = frame_dists.reshape(n_q, T, n_s, T).permute(0, 2, 1, 3)  # tb sb ts ss
    cum = otam_cum_dist(dists, o.otam_lambda)
    if o.otam_bidirectional:
        cum = cum + otam_cum_dist(dists.transpose(-1, -2), o.otam_lambda)
    class_dists = torch.stack([cum[:, unique == c].mean(1) for c in unique]).transpose(0, 1)  # (Q, N)
    logits = -class_dists
    reduce = "sum" if o.ce == "sum" else "mean"
    loss = F.cross_entropy(logits, target_labels, reduction=reduce)
    if class_text is not None and o.text_loss_weight:
        loss = loss + o.text_loss_weight * F.cross_entropy(class_logits, real_labels)
    return logits, loss / batch_size

