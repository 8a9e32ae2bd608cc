"""A straightforward per-episode re-derivation of the released ``CNN_BiMHM_MoLo`` forward and its training loss, written
from what alibaba-mmai-research/CLIP-FSAR computes (``models/base/few_shot.py``, ``runs/train_net_few_shot.py``).

One episode in the released layout (supports and queries in any order, their episode labels, the split class ids),
the cached maps standing in for the backbone's ``(V T, Dt, h, w)`` output, the weights read from the project's
module; the release's operation order: 2-D maps per frame, the Conv3d on ``(V, Dt, T, h, w)``, ``motion_up`` as a
Conv2d then ReLU then ``AdaptiveAvgPool2d(1)``, prototypes grouped by ``unique(support_labels)`` with
``index_select``, ``cos_sim`` with 0.01 added to the product of norms, the long-short distances gathered per class
by ``extract_class_indices``. Dropout off (the test switches it off in the module). Not part of the package.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from tests.reference_heads import cos_sim, positional_encoder, prenorm_attention


def _class_indices(labels: Tensor, which: Tensor) -> Tensor:
    """The released ``extract_class_indices``: positions where ``labels == which``, as a 1-D index."""
    return torch.nonzero(torch.eq(labels, which), as_tuple=False).reshape(-1)


def _transformer_v2(block, x: Tensor) -> Tensor:
    """``Transformer_v2`` at depth 1: ``x = PreNormattention(Attention)(x); x = FeedForward(x) + x``."""
    x = prenorm_attention(block.attn, x)
    lin1, lin2 = block.ffn[0], block.ffn[3]
    return lin2(F.gelu(lin1(x))) + x


def molo_episode(model, support_tokens: Tensor, support_labels: Tensor, query_tokens: Tensor, target_labels: Tensor,
                 real_support: Tensor, real_target: Tensor) -> tuple[Tensor, Tensor]:
    """``CNN_BiMHM_MoLo.forward`` (reconstruction off) and the released loss for ONE episode.

    Args:
        model: the project's MoLo head (weights and options read).
        support_tokens: ``(S, T, 1, P, Dt)`` cached tokens, any order; support_labels ``(S,)`` episode labels.
        query_tokens: ``(Q, T, 1, P, Dt)``; target_labels ``(Q,)``.
        real_support, real_target: split class ids of the supports and the queries.

    Returns:
        logits ``(Q, N)`` and the loss of the episode (the released terms, times ``BATCH_SIZE``).
    """
    o = model.options
    h, w = o.token_grid
    T = support_tokens.shape[1]
    cls = int(o.token_cls)

    def backbone(tokens: Tensor) -> Tensor:  # (V, T, 1, P, Dt) -> the backbone's (V T, Dt, h, w)
        v, t, _, _, dt = tokens.shape
        return tokens[:, :, 0, cls:].reshape(v * t, h, w, dt).permute(0, 3, 1, 2)

    def motion(features: Tensor) -> Tensor:  # get_feats' motion branch, (V T, Dt, h, w) -> (V, T-1, Dt)
        dim = features.shape[1]
        r = dim // o.motion_factor
        m = model.motion_reduce(features.reshape(-1, T, dim, h, w).permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)
        m = m.reshape(-1, r, h, w)
        mc = model.motion_conv(m)
        d = mc.reshape(-1, T, r, h, w)[:, 1:] - m.reshape(-1, T, r, h, w)[:, :-1]
        d = d.reshape(-1, r, h, w)
        d = F.relu(model.motion_up(d))
        return F.adaptive_avg_pool2d(d, 1).squeeze(-1).squeeze(-1).reshape(-1, T - 1, dim)

    def sequence(x: Tensor, token: Tensor, block) -> Tensor:
        x = torch.cat((token.expand(x.shape[0], -1, -1), x), dim=1)
        return F.relu(_transformer_v2(block, positional_encoder(model, x)))

    support_features, target_features = backbone(support_tokens), backbone(query_tokens)
    dim = support_features.shape[1]
    sfm = sequence(motion(support_features), model.class_token_motion, model.temporal_atte_before_motion)
    tfm = sequence(motion(target_features), model.class_token_motion, model.temporal_atte_before_motion)
    sf = F.adaptive_avg_pool2d(support_features, 1).reshape(-1, T, dim)
    tf = F.adaptive_avg_pool2d(target_features, 1).reshape(-1, T, dim)
    sf = sequence(sf, model.class_token, model.temporal_atte_before)
    tf = sequence(tf, model.class_token, model.temporal_atte_before)
    class_logits = model.classification_layer(torch.cat([sf.mean(1) + sfm.mean(1), tf.mean(1) + tfm.mean(1)], 0))

    unique_labels = torch.unique(support_labels)
    sf = torch.stack([torch.index_select(sf, 0, _class_indices(support_labels, c)).mean(0) for c in unique_labels])
    sfm = torch.stack([torch.index_select(sfm, 0, _class_indices(support_labels, c)).mean(0) for c in unique_labels])

    def long_short(s: Tensor, t: Tensor, scale) -> tuple[Tensor, Tensor]:
        s_g, t_g, s, t = s[:, 0], t[:, 0], s[:, 1:], t[:, 1:]
        d = 1 - cos_sim(s, t_g, o.cos_eps)  # (N, L, Q)
        s2q = torch.stack([torch.sum(torch.index_select(d, 0, _class_indices(unique_labels, c)), dim=1)
                           for c in unique_labels]).squeeze(1)  # (N, Q)
        d = 1 - cos_sim(t, s_g, o.cos_eps)  # (Q, L, N)
        q2s = torch.stack([torch.sum(torch.index_select(d, 2, _class_indices(unique_labels, c)), dim=1)
                           for c in unique_labels]).squeeze(2)  # (N, Q)
        return (s2q * scale).t(), (q2s * scale).t()  # 'c q -> q c'

    def bi_mhm(s: Tensor, t: Tensor) -> Tensor:
        n_q, n_s, L = t.shape[0], s.shape[0], s.shape[1] - 1
        s, t = s[:, 1:].reshape(n_s * L, -1), t[:, 1:].reshape(n_q * L, -1)
        dists = (1 - cos_sim(t, s, o.cos_eps)).reshape(n_q, L, n_s, L).permute(0, 2, 1, 3)  # tb sb ts ss
        cum = dists.min(3)[0].sum(2) + (dists.min(2)[0].sum(2) if o.bidirectional else 0)
        return torch.stack([torch.mean(torch.index_select(cum, 1, _class_indices(unique_labels, c)), dim=1)
                            for c in unique_labels]).t()  # (Q, N)

    s2q, q2s = long_short(sf, tf, model.scale)
    s2q_m, q2s_m = long_short(sfm, tfm, model.scale_motion)
    class_dists = bi_mhm(sf, tf) + o.motion_weight * bi_mhm(sfm, tfm)
    logits = -class_dists
    ce = lambda x: F.cross_entropy(x, target_labels)  # noqa: E731
    loss = (ce(logits) + o.class_loss_weight * F.cross_entropy(class_logits, torch.cat([real_support, real_target]))
            + o.contrastive_weight * (ce(-s2q) + ce(-q2s) + ce(-s2q_m) + ce(-q2s_m)))
    return logits, loss
