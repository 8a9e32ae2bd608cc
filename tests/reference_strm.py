"""A straightforward per-episode re-derivation of STRM, written from what the released code computes
(Anirudh257/strm ``model.py`` ``CNN_STRM.forward`` and its blocks, ``run.py`` ``train_task``, ``utils.loss``), for
``tests/test_head_strm.py``. Dropout off; it reads the weights of the project's module. Not part of the package.

The TRX stage is the released ``TemporalCrossTransformer``, the same class STRM's ``model.py`` carries over from
TRX: its re-derivation is ``tests/reference_heads.trx_episode`` (run on the module's ``trx``).
"""

from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import Tensor
from torch.nn import functional as F

from tests.reference_heads import _released_pe, trx_episode


def _linear(layer, x: Tensor) -> Tensor:
    return x @ layer.weight.t() + layer.bias


def self_attn_bot(block, x: Tensor, pe_scale: float) -> Tensor:
    """``Self_Attn_Bot.forward``: ``(B, 16, D)`` patches, bmm attention without scaling, gamma, the 3-layer MLP."""
    b, p, d = x.shape
    x = x + _released_pe(p, d, int(p * 1.5), pe_scale, x.dtype)
    residual = x
    proj_query = _linear(block.query_proj, x)  # B x 16 x D
    proj_key = _linear(block.key_proj, x).permute(0, 2, 1)  # B x D x 16
    energy = torch.bmm(proj_query, proj_key)
    attention = torch.softmax(energy, dim=-1)
    proj_value = _linear(block.value_proj, x).permute(0, 2, 1)  # B x D x 16
    out = torch.bmm(proj_value, attention.permute(0, 2, 1)).permute(0, 2, 1)  # B x 16 x D
    out = block.gamma * out + residual
    inp, hid, last = block.mlp[0], block.mlp[2], block.mlp[4]  # Bottleneck_Perceptron_3_layer_res
    h = torch.relu(_linear(inp, out))
    h = torch.relu(_linear(hid, h))
    return _linear(last, h) + out


def mlp_mix_enrich(block, x: Tensor, pe_scale: float) -> Tensor:
    """``MLP_Mix_Enrich.forward``: ``(B, T, D)``, the token MLP on the permuted frames, then the channel MLP."""
    b, t, d = x.shape
    x = x + _released_pe(t, d, int(t * 1.5), pe_scale, x.dtype)
    residual1 = x
    tok = x.permute(0, 2, 1)
    tok = _linear(block.token_mlp[2], torch.relu(_linear(block.token_mlp[0], tok)))
    out = tok.permute(0, 2, 1) + residual1
    residual2 = out
    return _linear(block.channel_mlp[2], torch.relu(_linear(block.channel_mlp[0], out))) + residual2


def distance_loss(cls_w, support: Tensor, support_labels: Tensor, queries: Tensor, s: int, way: int) -> Tensor:
    """``DistanceLoss.forward`` (dropout off): tuples by ``index_select``, ``clsW`` and ReLU, a loop over the
    classes, ``cdist``, the min over the class's tuples, the mean over the query's tuples, written into column c."""
    n_q, n_s, t, d = queries.shape[0], support.shape[0], support.shape[1], support.shape[2]
    tuples = [torch.tensor(c) for c in combinations(range(t), s)]
    sup = torch.stack([torch.index_select(support, -2, p).reshape(n_s, -1) for p in tuples], dim=-2)  # (S, L, sD)
    qry = torch.stack([torch.index_select(queries, -2, p).reshape(n_q, -1) for p in tuples], dim=-2)
    query_embed = torch.relu(_linear(cls_w, qry.reshape(-1, d * s)))  # (Q*L, D/2)
    dist_all = torch.zeros(n_q, way, dtype=support.dtype)
    for c in torch.unique(support_labels):
        idx = torch.nonzero(torch.eq(support_labels, c)).reshape(-1)
        class_k = torch.index_select(sup, 0, idx).reshape(-1, d * s)  # (K*L, sD)
        support_embed = torch.relu(_linear(cls_w, class_k))
        distmat = torch.cdist(query_embed, support_embed)  # (Q*L, K*L)
        min_dist = distmat.min(dim=1)[0].reshape(n_q, len(tuples))
        dist_all[:, c.long()] = -1.0 * min_dist.mean(dim=1)
    return dist_all


def released_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``utils.loss`` with one sample: ``-sum(logsumexp(-CE) - log 1)``, the cross-entropy summed over the queries."""
    log_py = -F.cross_entropy(logits, labels, reduction="none").unsqueeze(0)
    score = torch.logsumexp(log_py, dim=0) - math.log(1.0)
    return -torch.sum(score, dim=0)


def strm_episode(model, support_tokens: Tensor, support_labels: Tensor, query_tokens: Tensor, target_labels: Tensor,
                 tasks_per_batch: int = 1) -> tuple[Tensor, Tensor]:
    """``CNN_STRM.forward`` and ``train_task``'s loss and accuracy logits for one episode.

    Args:
        model: the project's STRM (weights read; position tables recomputed from the released formula).
        support_tokens: ``(S, T, 1, P, Dt)`` in any order, ``support_labels`` ``(S,)`` episode labels 0..N-1.
        query_tokens: ``(Q, T, 1, P, Dt)``; ``target_labels`` ``(Q,)``.

    Returns:
        the logits the release classifies by (``logits + 0.1 logits_post_pat``, ``(Q, N)``) and its loss
        (``loss(logits) + 0.1 loss(logits_post_pat)``, each divided by ``tasks_per_batch``).
    """
    o = model.options
    way = int(torch.unique(support_labels).numel())
    t = support_tokens.shape[1]
    h, w = o.token_grid
    dt = support_tokens.shape[-1]

    def features(tokens: Tensor) -> Tensor:
        # the ResNet's (B, D, h, w) map: drop a class token, the row-major patches back onto the grid
        patches = tokens[:, :, 0, int(bool(o.token_cls)):]  # (V, T, h*w, Dt)
        fmap = patches.reshape(-1, h, w, dt).permute(0, 3, 1, 2)  # (V*T, Dt, h, w)
        pooled = torch.nn.AdaptiveMaxPool2d((4, 4))(fmap)  # (V*T, Dt, 4, 4)
        x = pooled.reshape(-1, dt, 16).permute(0, 2, 1)  # (V*T, 16, Dt)
        x = self_attn_bot(model.patch_attention, x, o.pe_scale)
        return torch.mean(x, dim=1).reshape(-1, t, dt)  # (V, T, Dt)

    context_features, target_features = features(support_tokens), features(query_tokens)
    post_pat = [distance_loss(m, context_features, support_labels, target_features, s, way)
                for m, s in zip(model.distance_maps, o.cardinalities)]
    logits_post_pat = torch.mean(torch.stack(post_pat, dim=-1), dim=[-1])
    context_fr = mlp_mix_enrich(model.frame_enrichment, context_features, o.pe_scale)
    target_fr = mlp_mix_enrich(model.frame_enrichment, target_features, o.pe_scale)
    logits, _ = trx_episode(model.trx, context_fr, support_labels, target_fr, target_labels)
    loss = released_loss(logits, target_labels) / tasks_per_batch
    loss_post_pat = released_loss(logits_post_pat, target_labels) / tasks_per_batch
    return logits + 0.1 * logits_post_pat, loss + 0.1 * loss_post_pat
