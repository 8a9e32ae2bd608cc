"""A straightforward per-episode re-derivation of EMP-Net, written from what the released code computes.

``EMP_Net.get_feats``, ``EMP_Net.forward`` and the EMP-Net branch of the training loop's loss
(cong-wu/EMP-Net ``models/base/few_shot.py``, ``runs/train_net_few_shot.py``), for ONE episode in the released
layout: supports in any order with their episode labels, frames flattened into the batch axis (``(B T) P C``),
the released rearranges, prototypes grouped by ``unique(labels)``, a cell-by-cell OTAM, attention written out
with ``to_qkv(...).chunk(3)``. It reads the weights of the project's module. One change from the release, the
fair one the project makes: every episode class's text is looked up among all the supports, not the first five.
Not part of the package.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tests.reference_heads import cos_sim, otam_cum_dist, transformer_v1


def _prenorm_attention(layer, x: Tensor) -> Tensor:
    """``PreNormattention(dim, Attention(dim, heads, dim_head, dropout))`` on ``(b, n, D)``."""
    h = layer.heads
    q, k, v = layer.to_qkv(layer.norm(x)).chunk(3, dim=-1)
    split = lambda y: y.reshape(y.shape[0], y.shape[1], h, -1).permute(0, 2, 1, 3)  # b n (h d) -> b h n d
    q, k, v = split(q), split(k), split(v)
    dots = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    out = dots.softmax(dim=-1) @ v
    out = out.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)  # b h n d -> b n (h d)
    return layer.to_out(out) + x


def _transformer_v3(block, x: Tensor, num_frames: int) -> Tensor:
    """``Transformer_v3.forward(x, num_frame)`` on ``(B T, P, D)``."""
    x_s = x[:, 1:]
    x_t = x[:, 0].reshape(-1, num_frames, x.shape[-1])  # (b t) c -> b t c
    x_s = _prenorm_attention(block.spatial, x_s)
    x_t = _prenorm_attention(block.temporal, x_t)
    x_t = x_t.reshape(-1, x.shape[-1])  # b t c -> (b t) c
    x = torch.cat([x_t.unsqueeze(1), x_s], 1)
    return block.ffn(x) + x


def _tv1(layer, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return transformer_v1([layer], q, k, v)


def _get_feats(model, tokens: Tensor) -> Tensor:
    """``get_feats`` for one set of videos: ``(B, T, 3, P, D)`` -> ``(B T, P, D)``."""
    b, t, _, p, d = tokens.shape
    x3, x7, x11 = (tokens[:, :, i].reshape(b * t, p, d) for i in range(3))
    x3 = _transformer_v3(model.reason[0], x3, t)
    x7 = x3 + x7
    x7 = _transformer_v3(model.reason[1], x7, t)
    x = x7 + x11
    return _transformer_v3(model.reason[2], x, t)


def _levels(model, feats: Tensor, t: int) -> tuple[Tensor, Tensor, Tensor]:
    """The decoupling and the interactive reasoning: patches ``(B T, M, D)``, frames and tokens ``(B, T, D)``."""
    patch = feats[:, 1:]
    m, d = patch.shape[1], patch.shape[2]
    frame = patch.reshape(-1, t, m, d).mean(2)
    token = feats[:, 0].reshape(-1, t, d)
    token = _tv1(model.inter_token, token, token, token)
    temp = token.reshape(-1, d)
    patch = torch.cat([temp.unsqueeze(1), patch], 1)
    patch = _tv1(model.inter_patch, patch, patch, patch)[:, 1:]
    temp = patch.reshape(-1, t, m, d).mean(2)
    frame = temp + frame
    frame = _tv1(model.inter_frame, frame, frame, frame)
    return patch, frame, token


def _class_mean(x: Tensor, labels: Tensor, c: Tensor) -> Tensor:
    return torch.mean(torch.index_select(x, 0, torch.nonzero(labels == c).reshape(-1)), dim=0)


def _otam_probs(query: Tensor, support: Tensor, n_q: int, n_s: int, t: int, eps: float, lbda: float) -> Tensor:
    """Support-query matching of one level: ``(Q T, D)``, ``(N T, D)`` -> ``softmax(-OTAM)`` ``(Q, N)``."""
    dists = 1 - cos_sim(query, support, eps)  # (Q T, N T)
    dists = dists.reshape(n_q, t, n_s, t).permute(0, 2, 1, 3)  # (tb ts) (sb ss) -> tb sb ts ss
    cum = otam_cum_dist(dists, lbda) + otam_cum_dist(dists.transpose(-1, -2), lbda)
    return torch.softmax(-cum, dim=1)


def empnet_episode(model, support_tokens: Tensor, support_labels: Tensor, query_tokens: Tensor,
                   target_labels: Tensor, support_text: Tensor) -> tuple[Tensor, Tensor]:
    """One episode's released logits ``(Q, N)`` (the mean of the six probabilities) and loss.

    Args:
        model: the project's EMPNet (its weights and options are read).
        support_tokens: ``(S, T, 3, P, D)`` in any order; support_labels ``(S,)`` episode labels.
        query_tokens: ``(Q, T, 3, P, D)``; target_labels ``(Q,)``.
        support_text: ``(S, D)`` each support's class text (``text_features[real_support_labels]``).
    """
    o = model.options
    eps, lbda = o.cos_eps, o.otam_lambda
    s, t = support_tokens.shape[:2]
    q = query_tokens.shape[0]
    d = support_tokens.shape[-1]
    sp, sf, st = _levels(model, _get_feats(model, support_tokens), t)
    tp, tf, tt = _levels(model, _get_feats(model, query_tokens), t)
    m = sp.shape[1]

    unique_labels = torch.unique(support_labels)
    n = len(unique_labels)
    context = [None] * n  # the release's real_unique_labels loop, over every support (the release: the first 5)
    for i in range(n):
        for j in range(s):
            if int(support_labels[j]) == i:
                context[i] = support_text[j]
    context = torch.stack(context)  # (N, D)

    visual = torch.cat([sp, tp], dim=0).reshape(-1, t, m, d)
    patch_text = cos_sim(visual, context, eps).mean(dim=1)  # (V, M, N)
    patch_text = torch.topk(patch_text, o.patch_topk, dim=1)[0].mean(dim=1).softmax(dim=1)
    visual = torch.cat([sf, tf], dim=0)
    frame_text = torch.topk(cos_sim(visual, context, eps), o.frame_topk, dim=1)[0].mean(dim=1).softmax(dim=1)
    visual = torch.cat([st, tt], dim=0)
    token_text = cos_sim(visual, context, eps).mean(dim=1).softmax(dim=1)

    context = support_text
    if o.merge_before:
        sp4 = sp.reshape(-1, t, m, d)
        sp = torch.stack([_class_mean(sp4, support_labels, c) for c in unique_labels]).reshape(-1, m, d)
        sf = torch.stack([_class_mean(sf, support_labels, c) for c in unique_labels])
        st = torch.stack([_class_mean(st, support_labels, c) for c in unique_labels])
        context = torch.stack([_class_mean(context, support_labels, c) for c in unique_labels])

    fuse = torch.cat([st, context.unsqueeze(1)], dim=1)
    st = st + context.unsqueeze(1)
    st = _tv1(model.fusion_token, st, fuse, fuse)
    fuse = torch.cat([sf, context.unsqueeze(1)], dim=1)
    sf = sf + context.unsqueeze(1)
    sf = _tv1(model.fusion_frame, sf, fuse, fuse)
    b = sp.shape[0] // t
    sp = sp.reshape(b, t, m, d).permute(0, 2, 1, 3).reshape(b * m, t, d)  # (B T) N C -> (B N) T C
    text = context.unsqueeze(1).unsqueeze(1).repeat(1, m, 1, 1).reshape(b * m, 1, d)
    fuse = torch.cat([sp, text], dim=1)
    sp = sp + text
    sp = _tv1(model.fusion_patch, sp, fuse, fuse)
    sp = sp.reshape(b, m, t, d).permute(0, 2, 1, 3).reshape(b * t, m, d)  # (B N) T C -> (B T) N C

    tt = _tv1(model.fusion_token, tt, tt, tt)
    tf = _tv1(model.fusion_frame, tf, tf, tf)
    tp = tp.reshape(q, t, m, d).permute(0, 2, 1, 3).reshape(q * m, t, d)
    tp = _tv1(model.fusion_patch, tp, tp, tp)
    tp = tp.reshape(q, m, t, d).permute(0, 2, 1, 3).reshape(q * t, m, d)

    if not o.merge_before:
        sp4 = sp.reshape(-1, t, m, d)
        sp = torch.stack([_class_mean(sp4, support_labels, c) for c in unique_labels]).reshape(-1, m, d)
        sf = torch.stack([_class_mean(sf, support_labels, c) for c in unique_labels])
        st = torch.stack([_class_mean(st, support_labels, c) for c in unique_labels])

    token = _otam_probs(tt.reshape(-1, d), st.reshape(-1, d), q, n, t, eps, lbda)
    frame = _otam_probs(tf.reshape(-1, d), sf.reshape(-1, d), q, n, t, eps, lbda)
    patch = _otam_probs(tp.mean(1), sp.mean(1), q, n, t, eps, lbda)

    logits = ((patch + frame + token) + (patch_text[-q:] + frame_text[-q:] + token_text[-q:])) / 6.0
    loss1 = F.cross_entropy(patch, target_labels) + F.cross_entropy(frame, target_labels) \
        + F.cross_entropy(token, target_labels)
    labels = torch.cat([support_labels, target_labels], 0)
    loss2 = F.cross_entropy(patch_text, labels) + F.cross_entropy(frame_text, labels) \
        + F.cross_entropy(token_text, labels)
    return logits, loss1 + loss2
