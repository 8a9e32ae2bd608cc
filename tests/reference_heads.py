"""Straightforward per-episode re-derivations of the registered heads, written from what the released code computes.

Each function takes ONE episode in the released code's layout (supports in any order with their episode
labels, queries, global class ids), reads the weights of the project's module, and recomputes logits
and loss with plain loops and the released operation order (e.g. CLIP-FSAR's text token appended
*after* the frames, prototypes grouped by ``unique(labels)``, a cell-by-cell OTAM). The tests compare
the project's batched heads with these in float64. Not part of the package.
"""

from __future__ import annotations

import math

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



def positional_encoder(model, x: Tensor) -> Tensor:
    """The released ``PositionalEncoder.forward`` (dropout off), its table built by the released double loop."""
    o = model.options
    d = x.shape[-1]
    pe = torch.zeros(20, d)  # max_seq_len 20, float32 as released
    for pos in range(20):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / (10000 ** ((2 * i) / d)))
            pe[pos, i + 1] = math.cos(pos / (10000 ** ((2 * (i + 1)) / d)))
    x = x * math.sqrt(d / o.position_a)
    return x + o.position_b * pe[: x.shape[1]].to(x.dtype)


def prenorm_attention(layer, x: Tensor) -> Tensor:
    """``PreNormattention(D, Attention(D, heads, D // heads))``: ``fn(LN(x)) + x``, q|k|v chunks, 'b n (h d) -> b h n d'."""
    h = layer.heads
    xn = layer.norm(x)
    q, k, v = layer.to_qkv(xn).chunk(3, dim=-1)
    b, n, hd = q.shape
    split = lambda t: t.reshape(b, n, h, hd // h).permute(0, 2, 1, 3)
    dots = split(q) @ split(k).transpose(-1, -2) * (hd // h) ** -0.5
    out = (dots.softmax(dim=-1) @ split(v)).permute(0, 2, 1, 3).reshape(b, n, hd)
    return layer.to_out(out) + x


def multi_head_attention(mha, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The released ``MultiHeadAttention.forward``: heads folded into the batch head-major, ``bmm``, post-norm."""
    n_head, d_k = mha.heads, mha.d_k
    d_v = d_k
    sz_b, len_q, _ = q.shape
    len_k, len_v = k.shape[1], v.shape[1]
    residual = q
    q = mha.w_qs(q).view(sz_b, len_q, n_head, d_k)
    k = mha.w_ks(k).view(sz_b, len_k, n_head, d_k)
    v = mha.w_vs(v).view(sz_b, len_v, n_head, d_v)
    q = q.permute(2, 0, 1, 3).contiguous().view(-1, len_q, d_k)
    k = k.permute(2, 0, 1, 3).contiguous().view(-1, len_k, d_k)
    v = v.permute(2, 0, 1, 3).contiguous().view(-1, len_v, d_v)
    attn = torch.bmm(q, k.transpose(1, 2)) / (d_k ** 0.5)
    output = torch.bmm(F.softmax(attn, 2), v)
    output = output.view(n_head, sz_b, len_q, d_v).permute(1, 2, 0, 3).contiguous().view(sz_b, len_q, -1)
    return mha.layer_norm(mha.fc(output) + residual)


def hyrsm_temporal_matrices(t: int, window: int, balance: float) -> tuple[Tensor, Tensor]:
    """HyRSM++'s ``temproal_regular`` and ``temproal_regular_label`` by the released double loops."""
    w, m = torch.zeros(t, t), torch.zeros(t, t)
    for i in range(t):
        for j in range(t):
            if abs(i - j) <= window:
                w[i, j] = 1.0 / (pow(i - j, 2) + 1.0)
                m[i, j] = 1.0
            else:
                w[i, j] = 1.0 - torch.exp(torch.tensor(-pow(abs(i - j) - window, 2) / balance))
    return w, m


def hyrsm_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                  real_labels: Tensor, plus_plus: bool = False, batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_HyRSM_1shot`` / ``CNN_HyRSM_5shot`` (``plus_plus``: ``CNN_HyRSM_plusplus_*``) forward and the training
    loop's loss (``USE_CLASSIFICATION`` + ``USE_LOCAL``, and ``TEMPORAL_LOSS_WEIGHT`` for HyRSM++) for one episode,
    dropout off, one query at a time.

    Args:
        model: the project's HyRSM or HyRSM++ head (its weights and options are read).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels.
        query: ``(Q, T, D)`` in any order; target_labels ``(Q,)``.
        real_labels: ``(S+Q,)`` split class ids of [supports; queries].

    Returns:
        logits ``(Q, N)`` and the loss (times ``batch_size``: per episode).
    """
    o = model.options
    T = support.shape[1]
    conv = model.layer2  # Conv1d(2D, D, 1)
    support_features = F.relu(prenorm_attention(model.temporal_atte_before, positional_encoder(model, support)))
    target_features = F.relu(prenorm_attention(model.temporal_atte_before, positional_encoder(model, query)))
    class_logits = model.classification_layer(torch.cat([support_features, target_features], 0)).reshape(-1, o.num_classes)
    unique_labels = torch.unique(support_labels)
    if o.form == "5shot":  # prototypes before the set module
        members = torch.stack([support_features[support_labels == c].mean(0) for c in unique_labels])
    else:
        members = support_features
    rows, sup_dists, qry_dists = [], [], []
    for qi in range(query.shape[0]):
        feature_in = torch.cat([members.mean(1), target_features[qi].mean(0, keepdim=True)], 0)[None]  # (1, M+1, D)
        feature_in = F.relu(multi_head_attention(model.temporal_atte, feature_in, feature_in, feature_in))[0]
        sup = torch.cat([members, feature_in[:-1, None].repeat(1, T, 1)], 2)  # (M, T, 2D)
        sup = conv(sup.permute(0, 2, 1)).permute(0, 2, 1)  # (M, T, D)
        tgt = torch.cat([target_features[qi], feature_in[-1:].repeat(T, 1)], 1)  # (T, 2D)
        tgt = conv(tgt.t()[None]).permute(0, 2, 1)[0]  # (T, D)
        frame_dists = 1 - F.normalize(sup, dim=2) @ F.normalize(tgt, dim=1).t()  # (M, T support frames, T query frames)
        cum = frame_dists.min(2)[0].sum(1) + frame_dists.min(1)[0].sum(1)  # (M,)
        if o.form == "5shot":
            rows.append(torch.stack([cum[unique_labels == c].mean() for c in unique_labels]))
        else:
            rows.append(torch.stack([cum[support_labels == c].mean() for c in unique_labels]))
        ns, nq = F.normalize(sup, dim=2), F.normalize(tgt, dim=1)
        sup_dists.append(1 - ns @ ns.transpose(1, 2))  # (M, T, T)
        qry_dists.append(1 - nq @ nq.t())  # (T, T)
    logits = -torch.stack(rows)  # (Q, N)
    frame_labels = real_labels.unsqueeze(1).repeat(1, T).reshape(-1)
    loss = F.cross_entropy(logits, target_labels) + o.class_loss_weight * F.cross_entropy(class_logits, frame_labels)
    if plus_plus:
        w, m = hyrsm_temporal_matrices(T, o.window, o.temporal_balance)
        w, m = w.to(support.dtype), m.to(support.dtype)
        fs, fq = torch.cat(sup_dists), torch.stack(qry_dists)  # (Q*M, T, T), (Q, T, T)
        beta = o.balance_coeff
        regular = (torch.mean(fs * m * w + beta * (1 - m) * F.relu(w - fs))
                   + torch.mean(fq * m * w + beta * (1 - m) * F.relu(w - fq)))
        loss = o.temporal_loss_weight * regular + loss
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


def _sliding_window_prototypes(mha, support: Tensor, window: int) -> Tensor:
    """The released ``SlidingWindowPrototypeGenerator2.forward`` on ``(N, K, T, D)``: per class and window, the K
    shots' ``window`` frames flattened sample-major through ``MultiHeadAttention``, written into a zeros buffer
    (the released buffer is float32; here the input's dtype, so that float64 stays float64), then per frame the
    mean over the shots and over the windows that hold it."""
    num_classes, num_samples, num_frames, feature_dim = support.shape
    num_windows = num_frames - window + 1
    window_outputs = torch.zeros(num_classes, num_windows, num_samples * window, feature_dim, dtype=support.dtype)
    for c in range(num_classes):
        for w in range(num_windows):
            flat = support[c, :, w:w + window, :].reshape(num_samples * window, feature_dim).unsqueeze(0)
            window_outputs[c, w] = multi_head_attention(mha, flat, flat, flat).squeeze(0)
    prototypes = torch.zeros(num_classes, num_frames, feature_dim, dtype=support.dtype)
    for i in range(num_frames):
        agg = []
        for w in range(num_windows):
            if w <= i < w + window:
                window_w = window_outputs[:, w].reshape(num_classes, num_samples, window, feature_dim)
                agg.append(window_w[:, :, i - w, :].mean(dim=1))
        prototypes[:, i, :] = torch.stack(agg, dim=0).mean(dim=0)
    return prototypes


def _hausdorff_dist_window(dists1: Tensor, window_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The released ``hausdorff_dist_window``: repeatedly set to inf every row minimum (dim 3, then per column over
    dim 2) whose index is more than ``window_size`` from its row (column), until none is; returns the summed minima
    and the two masked distance tensors (``dists1`` masked in place, as released)."""
    dists2 = dists1.clone()
    t = dists1.shape[3]
    while True:
        min_values, min_indices = dists1.min(dim=3)
        diff = min_indices - torch.arange(t).unsqueeze(0).unsqueeze(0)
        valid = (diff <= window_size) & (diff >= -window_size)
        if valid.all():
            break
        bad = torch.nonzero(~valid)
        for i in range(bad.size(0)):
            j, k, m = bad[i]
            dists1[j][k][m][min_indices[j][k][m]] = float("inf")
    cum1 = min_values.sum(dim=2)
    while True:
        min_values, min_indices = dists2.min(dim=2)
        diff = min_indices - torch.arange(t).unsqueeze(0).unsqueeze(0)
        valid = (diff <= window_size) & (diff >= -window_size)
        if valid.all():
            break
        bad = torch.nonzero(~valid)
        for i in range(bad.size(0)):
            j, k, m = bad[i]
            dists2[j][k][min_indices[j][k][m]][m] = float("inf")
    cum2 = min_values.sum(dim=2)
    return cum1 + cum2, dists1, dists2


def _get_v_feat(feat: Tensor, index: Tensor) -> Tensor:
    """The released ``mpl_few_shot.get_v_feat``: for every k and row i, the mean of ``feat[i]`` at the indices
    ``index[k][i][:]``; then the mean over k."""
    mv = []
    for k in range(index.size(0)):
        rows = []
        for i in range(index.size(1)):
            rows.append(torch.mean(torch.stack([feat[i][index[k][i][j]] for j in range(index.size(2))]), dim=0))
        mv.append(torch.stack(rows))
    return torch.mean(torch.stack(mv), dim=0)


def mpl_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                top_k: int, batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """``mpl_few_shot.get_feats`` + ``forward`` (dropout off) and the training loop's loss for one episode.

    Top-k: the ``(Q, S, T, T)`` distances of the flattened supports to the queries, the two-way min-sum,
    ``rearrange('c q -> q c')`` (a transpose), ``topk`` smallest and largest per support, ``F.normalize`` of
    their difference, the weighted sum added to each support. Prototypes: class means (``unique(labels)``)
    plus ``SlidingWindowPrototypeGenerator2``. ``context2`` (``Transformer_v1``) on them; the key frames from
    ``hausdorff_dist_window`` of the pre-``context2`` prototypes and the queries, read by ``get_v_feat`` as
    released; the joint ``context2`` over [query keys; prototype keys]; the keys prepended; the min-sum
    distance; ``class_dists`` by ``extract_class_indices(unique_labels, c)``.

    Args:
        model: the project's MPL (its weights and options are read).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels 0..N-1.
        query: ``(Q, T, D)`` in any order; target_labels ``(Q,)``.
        top_k: ``DATA.TOP_K_TEST``.

    Returns:
        logits ``(Q, N)`` and the loss (``F.cross_entropy`` mean, divided by ``batch_size``).
    """
    o = model.options
    frame_num = support.shape[1]
    dim = support.shape[2]
    unique_labels = torch.unique(support_labels)
    query_num, n_support = query.shape[0], support.shape[0]
    if top_k != 0:
        s_m = support.unsqueeze(0).reshape(1, n_support * frame_num, dim)  # 'b h s d -> b (h s) d'
        frame_sim = torch.matmul(F.normalize(s_m, dim=2), F.normalize(query, dim=2).permute(0, 2, 1))
        dists = 1 - frame_sim.reshape(query_num, n_support, frame_num, frame_num)
        cum_dists = dists.min(3)[0].sum(2) + dists.min(2)[0].sum(2)  # (Q, S)
        values, indices = torch.topk(cum_dists.t(), top_k, dim=1, largest=False)
        values_max, _ = torch.topk(cum_dists.t(), top_k, dim=1, largest=True)
        w_q = F.normalize(values_max - values)
        shot_re = torch.stack([torch.sum(torch.stack([query[indices[i][j]] * w_q[i][j] for j in range(indices.size(1))]),
                                         dim=0) for i in range(indices.size(0))])
        support = support + shot_re
    mean_protos = torch.stack([support[torch.nonzero(support_labels == c).reshape(-1)].mean(0) for c in unique_labels])
    s_reshape = torch.stack([support[torch.nonzero(support_labels == c).reshape(-1)] for c in unique_labels])
    s = mean_protos + _sliding_window_prototypes(model.proto_attention, s_reshape, o.proto_window)  # (N, T, D)
    n_way = s.shape[0]
    support_re = s.unsqueeze(0).reshape(1, n_way * frame_num, dim)
    support_features = transformer_v1([model.context2], s, s, s)[:, :frame_num, :]
    frame_sim = torch.matmul(F.normalize(support_re, dim=2), F.normalize(query, dim=2).permute(0, 2, 1))
    dists = 1 - frame_sim.reshape(query_num, n_way, frame_num, frame_num)
    _, dists1, dists2 = _hausdorff_dist_window(dists, o.match_window)
    s_mean = support_features.mean(dim=1)
    t_mean = query.mean(dim=1)
    s_key = _get_v_feat(support_features, dists1.min(3)[1])
    t_key = _get_v_feat(query, dists2.min(2)[1].permute(1, 0, 2))
    feature_in = torch.cat([t_key.unsqueeze(0), s_key.unsqueeze(0)], dim=1)
    feature_out = transformer_v1([model.context2], feature_in, feature_in, feature_in)
    s_key = feature_out[:, -n_way:, :].permute(1, 0, 2) + s_mean.unsqueeze(1)
    t_key = feature_out[:, :-n_way, :].permute(1, 0, 2) + t_mean.unsqueeze(1)
    support_features = torch.cat([s_key, support_features], dim=1)
    target_features = torch.cat([t_key, query], dim=1)
    flat = support_features.unsqueeze(0).reshape(1, n_way * (frame_num + 1), dim)
    frame_sim = torch.matmul(F.normalize(flat, dim=2), F.normalize(target_features, dim=2).permute(0, 2, 1))
    dists = 1 - frame_sim.reshape(query_num, n_way, frame_num + 1, frame_num + 1)
    cum_dists = dists.min(3)[0].sum(2) + dists.min(2)[0].sum(2)  # (Q, N)
    class_dists = torch.stack([torch.mean(cum_dists[:, torch.nonzero(unique_labels == c).reshape(-1)], dim=1)
                               for c in unique_labels])  # (N, Q)
    logits = -class_dists.t()
    return logits, F.cross_entropy(logits, target_labels) / batch_size
def _get_other(x: Tensor) -> Tensor:
    """TEAM's ``get_other``: for every i along dim 1, the other entries, stacked on a new dim 1."""
    n = x.size(1)
    return torch.stack([torch.cat((x[:, 0:i], x[:, i + 1 : n]), dim=1) for i in range(n)], dim=1)


def _team_dpm(model, x: Tensor, other: Tensor | None = None, sim_pos: Tensor | None = None,
              sim_neg: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The released ``Discriminative_Pattern_Matching.forward`` (dropout off), both branches."""
    dpm, o = model.dpm, model.options
    ap = dpm.patterns.unsqueeze(0)  # the released AP is (1, M, D)
    m = ap.shape[1]
    temperature = (o.dim // o.heads) ** 0.5
    pe = _released_pe(x.shape[-2], o.dim, int(o.num_frames * 1.5), o.pe_scale, x.dtype)

    def attention(seq: Tensor) -> Tensor:  # ScaledDotProductAttention(ln(AP), ln(x), ln(x)), x with PE
        seq = seq + pe
        q, k, v = dpm.ln(ap), dpm.ln(seq), dpm.ln(seq)
        attn = F.softmax(torch.matmul(q / temperature, k.transpose(-1, -2)), dim=-1)
        return torch.matmul(attn, v)

    mlp = lambda y: dpm.mlp[2](torch.relu(dpm.mlp[0](y)))  # Bottleneck_Perceptron_2_layer
    tar_num, cls_num, t, c = x.shape
    out = attention(x.reshape(-1, t, c))
    if other is None:
        pos = ap + out
        pos = (pos + mlp(pos)).reshape(tar_num, cls_num, m, c)
        neg = ap - out
        neg = (neg + mlp(neg)).reshape(tar_num, cls_num, m, c)
        return pos, neg
    out = out.reshape(tar_num, cls_num, 1, m, c)
    out_other = attention(other.reshape(-1, t, c)).reshape(tar_num, cls_num, cls_num - 1, m, c)
    ap = ap.reshape(1, 1, 1, m, c)
    sim_pos, sim_neg = sim_pos.unsqueeze(-1), sim_neg.unsqueeze(-1)
    disc_pos = ap + out - sim_pos * (out_other - out)
    disc_pos = disc_pos + mlp(disc_pos)
    disc_neg = ap - out + sim_neg * (out_other - out)
    disc_neg = disc_neg + mlp(disc_neg)
    return disc_pos, disc_neg


def team_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                 batch_size: int = 1) -> tuple[Tensor, Tensor]:
    """The released ``TEAM.forward`` (dropout off) and ``TEAM.loss`` (``L_pos + L_neg``) for one episode.

    Args:
        model: the project's TEAM (its weights and options are read; the PE table is recomputed).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels.
        query: ``(Q, T, D)``; target_labels ``(Q,)``.

    Returns:
        logits ``(Q, N)`` (``-(d_pos + d_neg)``) and the loss divided by ``batch_size``.
    """
    unique = torch.unique(support_labels)
    spt = torch.stack([torch.index_select(support, 0, torch.nonzero(support_labels == c).reshape(-1)) for c in unique])
    spt, tar = spt.unsqueeze(0), query.unsqueeze(1).unsqueeze(1)  # (1, N, K, T, D), (Q, 1, 1, T, D)
    spt, tar = spt.mean(dim=2), tar.mean(dim=2)
    spt_pos, spt_neg = _team_dpm(model, spt)
    spt_pos, spt_neg = torch.relu(spt_pos), torch.relu(spt_neg)
    tar_pos, tar_neg = _team_dpm(model, tar)
    tar_pos, tar_neg = torch.relu(tar_pos), torch.relu(tar_neg)

    def spt_sim(x: Tensor) -> Tensor:  # get_spt_sim
        _, n, m, c = x.shape
        return F.cosine_similarity(x.unsqueeze(dim=2), _get_other(x).reshape(1, n, n - 1, m, c), dim=-1)

    disc_pos, disc_neg = _team_dpm(model, spt, _get_other(spt), spt_sim(spt_pos), spt_sim(spt_neg))
    disc_pos, disc_neg = torch.relu(disc_pos).mean(dim=2), torch.relu(disc_neg).mean(dim=2)

    def dists_pos(s: Tensor, t: Tensor) -> Tensor:
        return (1 - F.cosine_similarity(s, t, dim=-1)).sum(dim=-1)

    def dists_neg(s: Tensor, t: Tensor) -> Tensor:
        return (1 - _get_other(F.cosine_similarity(s, t, dim=-1))).sum(dim=-1).max(dim=-1)[0]

    d_pos = dists_pos(disc_pos, tar_pos)
    d_neg = (dists_neg(disc_pos, tar_neg) + dists_neg(disc_neg, tar_pos)) / 2
    loss = F.cross_entropy(-d_pos, target_labels.long()) + F.cross_entropy(-d_neg, target_labels.long())
    return -(d_pos + d_neg), loss / batch_size


def visil_fcn(fcn, similarity: Tensor) -> Tensor:
    """The released ``VisilFCN.forward``: ``q s lq ls -> (q s) 1 lq ls``, conv1, pool1, relu, conv2, pool2, relu,
    conv3, conv4, hardtanh, back to ``q s lq ls``."""
    q, s, lq, ls = similarity.shape
    x = similarity.reshape(q * s, 1, lq, ls)
    x = torch.relu(F.max_pool2d(fcn.conv1(x), (2, 2), stride=2))
    x = torch.relu(F.max_pool2d(fcn.conv2(x), (2, 2), stride=2))
    x = F.hardtanh(fcn.conv4(fcn.conv3(x)))
    return x.reshape(q, s, x.shape[-2], x.shape[-1])


def chamfer_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                    way: int, shot: int) -> tuple[Tensor, Tensor]:
    """The released ``MatchingBasedFewShotModel.forward`` and ``FewShotHead.loss`` for one episode.

    Supports come class-major, as the released ``VideoFeatureReader`` yields them (the released joint matching and
    ``get_video_to_class_similarity`` rely on that order). The matching function is taken from the module that
    ``get_matching_function`` picks, the transpose and the ViSiL filter as ``forward`` applies them.

    Returns:
        logits ``(Q, N)`` and the cross-entropy (mean over the queries).
    """
    from itertools import combinations

    o = model.options
    n_q, n_s = query.shape[0], support.shape[0]
    if o.tuple_length > 1:  # index_select each tuple, reshape (the frames concatenated), stack
        tuples = [torch.tensor(c) for c in combinations(range(support.shape[1]), o.tuple_length)]
        support = torch.stack([torch.index_select(support, -2, p).reshape(n_s, -1) for p in tuples], dim=-2)
        query = torch.stack([torch.index_select(query, -2, p).reshape(n_q, -1) for p in tuples], dim=-2)
    if o.projection:
        support, query = model.layer_norm(model.fc(support)), model.layer_norm(model.fc(query))
    l = support.shape[1]
    sim = cos_sim(query.reshape(n_q * l, -1), support.reshape(n_s * l, -1), o.cos_eps)  # (qb ql) (sb sl)
    sim = sim.reshape(n_q, l, n_s, l).permute(0, 2, 1, 3)  # qb sb ql sl
    if o.class_matching == "joint":  # q (w s) lq ls -> q w lq (s ls)
        sim = sim.reshape(n_q, way, shot, l, l).permute(0, 1, 3, 2, 4).reshape(n_q, way, l, shot * l)
    fn = "chamfer" if o.matching == "visil" else o.matching
    sim_t = sim.transpose(-2, -1) if fn in ("chamfer-support", "chamfer") else None
    if o.matching == "visil":
        sim = visil_fcn(model.visil, sim)
        sim_t = visil_fcn(model.visil, sim_t)

    def matching(x: Tensor) -> Tensor:
        if fn.startswith("chamfer"):
            return torch.mean(torch.max(x, dim=-1)[0], -1)
        if fn == "diag":
            return torch.mean(torch.diagonal(x, offset=0, dim1=-1, dim2=-2), -1)
        if fn == "linear":
            q, s = x.shape[:2]
            return model.linear(x.reshape(q * s, -1)).reshape(q, s)
        if fn == "mean":
            return torch.mean(torch.sum(x, dim=-1), dim=-1)
        if fn == "max":
            return torch.max(torch.max(x, dim=-1)[0], dim=-1)[0]
        if fn == "otam":
            distance = 1 - x
            votes = otam_cum_dist(distance, o.otam_lambda) + otam_cum_dist(distance.permute(0, 1, 3, 2), o.otam_lambda)
            return -(votes * 0.5)
        raise ValueError(fn)

    if fn == "chamfer-support":
        v2v = matching(sim_t)
    elif fn == "chamfer":
        v2v = 0.5 * (matching(sim) + matching(sim_t))
    else:
        v2v = matching(sim)
    v2c = torch.mean(v2v.reshape(n_q, way, -1), dim=2)  # a (b c) -> a b c, b = way
    v2c = v2c * model.temperature_weight
    v2c = v2c * model.global_temperature
    return v2c, F.cross_entropy(v2c, target_labels.long())
def _otam_v2_distance(model, support_seq: Tensor, target_seq: Tensor) -> Tensor:
    """The released ``otam_distance`` of CPM2C / CLIP-MEI: ``1 - cos_sim`` of the flattened frames,
    ``(tb ts) (sb ss) -> tb sb ts ss``, ``OTAM_cum_dist_v2`` (lambda from the options) one way or both."""
    o = model.options
    n_q, n_s = target_seq.shape[0], support_seq.shape[0]
    lq, ls, d = target_seq.shape[1], support_seq.shape[1], target_seq.shape[2]
    frame_dists = 1 - cos_sim(target_seq.reshape(-1, d), support_seq.reshape(-1, d), o.cos_eps)
    dists = frame_dists.reshape(n_q, lq, n_s, ls).permute(0, 2, 1, 3)  # tb sb ts ss
    cum = otam_cum_dist(dists, o.otam_lambda)
    if o.otam_bidirectional:
        cum = cum + otam_cum_dist(dists.permute(0, 1, 3, 2), o.otam_lambda)
    return cum


def _released_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``utils.loss`` of the TRX-style runners on ``logits.unsqueeze(0)``: one sample, so minus the sum over the
    rows of ``-F.cross_entropy(reduction='none')``, i.e. the cross-entropy summed over the rows."""
    log_py = -F.cross_entropy(logits, labels, reduction="none").unsqueeze(0)  # (1, rows)
    score = torch.logsumexp(log_py, dim=0) - math.log(1.0)
    return -torch.sum(score, dim=0)


def cpm2c_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                  real_support: Tensor, real_target: Tensor, class_text: Tensor) -> tuple[Tensor, Tensor]:
    """``CLIP_CPMMC_FSAR.forward`` as D-XH/CLIP-MEI ``models/model_cpm2c.py`` has it (training branch, dropout off) and
    the ``cpm2c`` branch of ``run/main_run.py``'s loss (``LMD [0.5, 1, 0]``) for one episode.

    Args:
        model: the project's CPM2C (weights and options read; ``motion_weight`` 0: the motion stream, whose
            every term the release multiplies by 0, is left out).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels.
        query: ``(Q, T, D)``; target_labels ``(Q,)``.
        real_support, real_target: split class ids of the supports and queries.
        class_text: ``(C, D)`` ``text_features_train``.

    Returns:
        logits ``(Q, N)`` (``logits_local``) and the released per-task loss (its cross-entropies divided by
        ``TASKS_PER_BATCH`` = the options' ``tasks_per_batch``, the consistency not).
    """
    o = model.options
    layers = model.context2
    tv1 = lambda x: transformer_v1(layers, x, x, x)  # noqa: E731
    context_support = class_text[real_support].unsqueeze(1)  # (S, 1, D)
    target_context_support = class_text[real_target].unsqueeze(1)  # (Q, 1, D): training only (consistency)

    def motion_feats(x: Tensor) -> Tensor:
        conv = model.motion_conv2(model.motion_conv1(x.permute(0, 2, 1)))
        f = conv[:, :, 1:] - x.permute(0, 2, 1)[:, :, :-1]
        b = conv[:, :, :-1] - x.permute(0, 2, 1)[:, :, 1:]
        return (0.5 * (f + b)).permute(0, 2, 1)

    def text_eh_temporal_transformer(sf: Tensor, tf: Tensor, token: Tensor) -> tuple:
        n_s, n_t, length = sf.shape[0], tf.shape[0], sf.shape[1]
        tf_t = tf + o.token_mix * target_context_support.repeat(1, length, 1)
        target_contra = tv1(torch.cat([target_context_support, tf_t], dim=1))
        s_token = token.expand(n_s, -1, -1)
        sf_t = sf + o.token_mix * s_token.repeat(1, length, 1)
        support_contra = tv1(torch.cat([s_token, sf_t], dim=1))
        t_token = token.expand(n_t, -1, -1)
        tf2 = tv1(torch.cat([t_token, tf + o.token_mix * t_token.repeat(1, length, 1)], dim=1))
        ctx = context_support  # mid_layer: an empty nn.Sequential
        sf2 = tv1(torch.cat([ctx, sf + o.token_mix * ctx.repeat(1, length, 1)], dim=1))
        pro = torch.stack([sf2[support_labels == c].mean(0) for c in torch.unique(support_labels)])
        return sf2, tf2, pro, support_contra, target_contra

    def gap(a: Tensor, b: Tensor) -> Tensor:
        return torch.mean(torch.norm(a - b, dim=[-2, -1]) ** 2)

    feats = torch.cat([support, query], dim=0).mean(1)
    class_logits = cos_sim(feats, class_text, o.cos_eps) * model.scale
    sf, tf, pro, s_contra, t_contra = text_eh_temporal_transformer(support, query, model.class_token.view(1, 1, -1))
    consist = o.normal_weight * (gap(sf, s_contra) + gap(tf, t_contra))
    dists = o.normal_weight * _otam_v2_distance(model, pro[:, 1:], tf[:, 1:])
    if o.motion_weight:
        sm, tm = motion_feats(support), motion_feats(query)
        sfm, tfm, prom, s_contra_m, t_contra_m = text_eh_temporal_transformer(sm, tm, model.class_token_motion.view(1, 1, -1))
        consist = consist + o.motion_weight * (gap(sfm, s_contra_m) + gap(tfm, t_contra_m))
        dists = dists + o.motion_weight * _otam_v2_distance(model, prom[:, 1:], tfm[:, 1:])
    logits = -dists
    tpb = o.tasks_per_batch
    loss = (o.text_loss_weight * _released_loss(class_logits, torch.cat([real_support, real_target])) / tpb
            + 1.0 * _released_loss(logits, target_labels) / tpb + o.consistency_weight * consist)
    return logits, loss


def clip_mei_episode(model, support: Tensor, support_labels: Tensor, query: Tensor, target_labels: Tensor,
                     real_support: Tensor, real_target: Tensor, class_text: Tensor) -> tuple[Tensor, Tensor]:
    """The released ``CNN.forward`` of D-XH/CLIP-MEI ``models/model_clipmei.py`` (training branch, dropout off) and the
    ``clipmei`` branch of ``run/main_run.py``'s loss for one episode, in the release's order: MIC (``mo``), QSA
    (``cpt_sem`` / ``sem`` / ``se_te``), TFE (``taskM``), the logits.

    The query token is made as released, from the mean of the queries' TRUE class texts
    (``target_context_support.mean(0)``); with as many queries in every class it equals the head's mean of the
    episode's class texts.

    Args:
        model: the project's CLIPMEI (weights and options read).
        support: ``(S, T, D)`` in any order; support_labels ``(S,)`` episode labels.
        query: ``(Q, T, D)`` in any order; target_labels ``(Q,)``.
        real_support, real_target: split class ids of the supports and queries.
        class_text: ``(C, D)`` ``text_features_train``.

    Returns:
        logits ``(Q, N)`` and the released per-task loss (``CE / TASKS_PER_BATCH + 0.001 dists``).
    """
    o = model.options
    tv1 = lambda layer, x: transformer_v1([layer], x, x, x)  # noqa: E731
    mix = o.token_mix
    context_support = class_text[real_support].unsqueeze(1)  # (S, 1, D)
    target_context_support = class_text[real_target].unsqueeze(1)  # (Q, 1, D)
    su, qu = support, query

    def get_motion_feats(x: Tensor) -> Tensor:  # (B, T, D) -> (B, D)
        conv = model.motion_conv2(model.motion_conv1(x.permute(0, 2, 1)))
        f = conv[:, :, 1:] - x.permute(0, 2, 1)[:, :, :-1]
        b = conv[:, :, :-1] - x.permute(0, 2, 1)[:, :, 1:]
        return (0.5 * (f + b)).mean(-1)

    def dis(x: Tensor, y: Tensor) -> Tensor:
        dim = [-2, -1] if len(x.shape) == 3 else [-1]
        return torch.mean(torch.norm(x - y, dim=dim) ** 2)

    def se_te(x: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        seq = torch.cat([token, x + mix * token], dim=1)
        seq = tv1(model.context2, seq)
        return seq[:, 1:, :], seq[:, 0, :].unsqueeze(1)

    # MIC
    su_mo, qu_mo = get_motion_feats(su), get_motion_feats(qu)
    su_m = torch.cat([su_mo.unsqueeze(1), su + mix * su_mo.unsqueeze(1)], dim=1)
    qu_m = torch.cat([qu_mo.unsqueeze(1), qu + mix * qu_mo.unsqueeze(1)], dim=1)
    qu_m, su_m = tv1(model.context2, qu_m), tv1(model.context2, su_m)
    qu_mo, su_mo, qu_m, su_m = qu_m[:, 0, :], su_m[:, 0, :], qu_m[:, 1:, :], su_m[:, 1:, :]
    mo_dist_pre = dis(get_motion_feats(qu_m), qu_mo) + dis(get_motion_feats(su_m), su_mo)
    # QSA
    token = target_context_support.mean(0)  # (1, 1, D): the released (label-reading) token
    target_token = model.token_mlp(token.expand(qu.size(0), -1, -1) * qu.mean(dim=[1, 2], keepdim=True))
    qu_real, token_q_real = se_te(qu, target_context_support)
    qu_fake, token_q_fake = se_te(qu, target_token)
    su_real, _ = se_te(su, context_support)
    unique = torch.unique(support_labels)
    su_pro = torch.stack([su_real[support_labels == c].mean(0) for c in unique])
    text_distance = (dis(target_context_support, target_token) + dis(token_q_real, token_q_fake)) * 0.5
    consist_distance = dis(torch.cat([token_q_real, qu_real], dim=1), torch.cat([token_q_fake, qu_fake], dim=1))
    class_dists_l = _otam_v2_distance(model, su_pro, qu_fake)
    dists = consist_distance + text_distance + model.mo_alpha[0] * mo_dist_pre
    # TFE
    suu = torch.stack([su_real[support_labels == c] for c in unique])  # (N, K, T, D)
    cn = suu.size(0)
    token_s = torch.mean(torch.cat([suu, qu_fake.unsqueeze(0).repeat(cn, 1, 1, 1)], dim=1), dim=1)  # (N, T, D)
    token_q = torch.mean(token_s, dim=0, keepdim=True)
    su_t = torch.cat([token_s, su_real], dim=0).permute(1, 0, 2)  # (T, N+S, D)
    qu_t = torch.cat([token_q, qu_fake], dim=0).permute(1, 0, 2)
    _su = tv1(model.context1, su_t).permute(1, 0, 2)
    _qu = tv1(model.context1, qu_t).permute(1, 0, 2)
    su_2, qu_2, su_t2, qu_t2 = _su[cn:], _qu[1:], _su[:cn], _qu[0].unsqueeze(0)
    su_pro2 = torch.stack([su_2[support_labels == c].mean(0) for c in unique])
    task_dist = _otam_v2_distance(model, su_pro2, qu_2) + _otam_v2_distance(model, su_t2, qu_t2)
    logits = -(o.qsa_weight * class_dists_l + task_dist)
    loss = _released_loss(logits, target_labels) / o.tasks_per_batch + o.aux_weight * dists
    return logits, loss
