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
