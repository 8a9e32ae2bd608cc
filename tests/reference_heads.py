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



def _released_pe(t: int, d: int, max_len: int, scale: float, dtype) -> Tensor:
    """The released ``PositionalEncoding`` table's first ``t`` rows, recomputed from its formula."""
    import math

    pe = torch.zeros(max_len, d, dtype=torch.float32)
    position = torch.arange(0, max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d, 2) * -(math.log(10000.0) / d))
    pe[:, 0::2] = torch.sin(position * div_term) * scale
    pe[:, 1::2] = torch.cos(position * div_term) * scale
    return pe[:t].to(dtype)


def trx_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_TRX.forward`` (dropout off) and the training loop's loss for one episode.

    Per cardinality (``TemporalCrossTransformer.forward``): position encoding, tuples by ``index_select`` of
    ``combinations`` and a reshape (the frames concatenated), ``k_linear``/``v_linear`` on the concatenated
    tuples, ``norm_k`` on keys only, then a loop over ``unique(support_labels)``: scores per query, a softmax
    per query over the class's K*L tuples, the prototype, ``norm(diff, dim=[-2, -1])**2 / L`` written into
    column ``c``. Logits: the mean over the cardinalities.

    Args:
        model: the project's TRX (its linear and norm weights are read; the PE table is recomputed).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels 0..N-1.
        query: ``(Q, T, D)``; target_labels ``(Q,)``.

    Returns:
        logits ``(Q, N)`` and the loss (``F.cross_entropy`` mean, divided by ``batch_size``).
    """
    import math
    from itertools import combinations

    o = model.options
    n_way = int(torch.unique(support_labels).numel())
    t = support.shape[1]
    all_logits = []
    for tr, s in zip(model.transformers, o.cardinalities):
        pe = _released_pe(t, o.dim, int(t * 1.5), o.pe_scale, support.dtype)
        sup, qry = support + pe, query + pe
        tuples = [torch.tensor(c) for c in combinations(range(t), s)]
        n_q, n_s, L = qry.shape[0], sup.shape[0], len(tuples)
        sup_t = torch.stack([torch.index_select(sup, -2, p).reshape(n_s, -1) for p in tuples], dim=-2)  # (S, L, sD)
        qry_t = torch.stack([torch.index_select(qry, -2, p).reshape(n_q, -1) for p in tuples], dim=-2)
        sk, qk = tr.norm_k(tr.k_linear(sup_t)), tr.norm_k(tr.k_linear(qry_t))
        sv, qv = tr.v_linear(sup_t), tr.v_linear(qry_t)
        a = sk.shape[-1]
        dists = torch.zeros(n_q, n_way, dtype=support.dtype)
        for c in torch.unique(support_labels):
            idx = torch.nonzero(support_labels == c, as_tuple=False).reshape(-1)
            class_k, class_v = sk[idx], sv[idx]  # (K, L, A)
            scores = torch.matmul(qk.unsqueeze(1), class_k.transpose(-2, -1)) / math.sqrt(a)  # (Q, K, L, L)
            scores = scores.permute(0, 2, 1, 3).reshape(n_q, L, -1)  # (Q, L, K*L)
            scores = torch.cat([torch.softmax(scores[i], dim=1) for i in range(n_q)])  # (Q*L, K*L)
            scores = scores.reshape(n_q, L, -1, L).permute(0, 2, 1, 3)  # (Q, K, L, L)
            proto = torch.matmul(scores, class_v).sum(dim=1)  # (Q, L, A)
            dist = torch.norm(qv - proto, dim=[-2, -1]) ** 2 / L
            dists[:, c.long()] = -dist
        all_logits.append(dists)
    logits = torch.stack(all_logits, dim=-1).mean(dim=-1)
    return logits, F.cross_entropy(logits, target_labels) / batch_size


def otam_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                 batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_OTAM.forward`` and the training loop's loss for one episode: ``1 - cos_sim`` of the flattened
    frames, ``(tb ts) (sb ss) -> tb sb ts ss``, the cell-by-cell OTAM in both directions (lambda from the
    model's options, 0.1 released), the mean over the supports of each ``unique(support_labels)`` class.

    Returns:
        logits ``(Q, N)`` and the loss (``F.cross_entropy`` mean, divided by ``batch_size``).
    """
    o = model.options
    n_q, t, d = query.shape
    n_s = support.shape[0]
    frame_dists = 1 - cos_sim(query.reshape(-1, d), support.reshape(-1, d), o.cos_eps)  # (Q*T, S*T)
    dists = frame_dists.reshape(n_q, t, n_s, t).permute(0, 2, 1, 3)  # tb sb ts ss
    cum = otam_cum_dist(dists, o.otam_lambda) + otam_cum_dist(dists.permute(0, 1, 3, 2), o.otam_lambda)
    class_dists = torch.stack([cum[:, torch.nonzero(support_labels == c).reshape(-1)].mean(dim=1)
                               for c in torch.unique(support_labels)])  # (N, Q)
    logits = -class_dists.transpose(0, 1)
    return logits, F.cross_entropy(logits, target_labels) / batch_size


def tsn_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_TSN.forward`` (``norm_sq_dist`` False) and the loss for one episode: mean over T, ``cos_sim`` of
    each query to each support, the mean over the supports of each ``unique(support_labels)`` class."""
    sim = cos_sim(query.mean(dim=1), support.mean(dim=1), model.options.cos_eps)  # (Q, S)
    class_sim = torch.stack([sim[:, torch.nonzero(support_labels == c).reshape(-1)].mean(dim=1)
                             for c in torch.unique(support_labels)])  # (N, Q)
    logits = class_sim.transpose(0, 1)
    return logits, F.cross_entropy(logits, target_labels) / batch_size
