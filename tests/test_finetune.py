"""Full mode's CLIP backbone (mdmf_cache.finetune): per-episode BatchNorm, partial fine-tuning,
gradient checkpointing and the saved checkpoint, on the tiny open_clip configs (CPU, float64 where
gradients are compared)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mdmf_cache.clip.backbone import load_backbone, weights_id
from mdmf_cache.errors import ConfigError
from mdmf_cache.clip.finetune import BN_MODES, CheckpointedStage, EpisodeBatchNorm2d, FrameEncoder, visual_blocks

E, B, T = 3, 1, 2  # episodes, videos per episode, frames


@pytest.fixture(scope="module")
def clips() -> dict[str, nn.Module]:
    """Both tiny CLIPs; ResNet BatchNorms get non-trivial weights and running statistics (open_clip
    initialises each Bottleneck's last BatchNorm weight to 0, which would zero the block's gradients)."""
    out = {name: load_backbone(name, None, "cpu").model for name in ("mdmf-tiny-rn", "mdmf-tiny-vit")}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in out["mdmf-tiny-rn"].modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return out


def _pixels(videos: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(videos, T, 3, 224, 224, generator=g, dtype=dtype)  # (B, T, 3, H, W)


def _loss(z: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A fixed random linear functional of the embeddings ``(B, T, D)`` (any weighting of rows)."""
    w = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=z.dtype)
    return (z * w).sum()


def _bn_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_episode_batchnorm2d_matches_sequential_batchnorm(momentum) -> None:
    """Per-episode statistics over (B, H, W) and E sequential running updates, against nn.BatchNorm2d."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4, momentum=momentum).double().train()
    bn = EpisodeBatchNorm2d.from_batchnorm(copy.deepcopy(ref))
    bn.episodes = 3
    x = torch.randn(3 * 2, 4, 5, 6, dtype=torch.float64) * 3 + 1  # E=3 episodes of 2 images
    y = bn(x)
    y_ref = torch.cat([ref(chunk) for chunk in x.split(2)])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, key), getattr(ref, key), rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3
    pooled = nn.BatchNorm2d(4, momentum=momentum).double().train()
    assert not torch.allclose(pooled(x), y)  # whole-batch statistics differ: the comparison above can fail
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x), ref(x))
    assert list(bn.state_dict()) == list(ref.state_dict())
    with pytest.raises(ValueError, match="not 4 equal episodes"):
        bn.train().episodes = 4
        bn(x)


def test_episodes_in_one_pass_equal_single_episode_passes(clips) -> None:
    """E episodes in one FrameEncoder forward+backward == E single-episode passes, accumulated: outputs,
    every gradient and every running buffer; pooled batch statistics would not match."""
    clip = copy.deepcopy(clips["mdmf-tiny-rn"]).double()
    batched = FrameEncoder(copy.deepcopy(clip), bn="episode")
    single = FrameEncoder(copy.deepcopy(clip), bn="episode")
    pooled = FrameEncoder(copy.deepcopy(clip), bn="episode")
    x = _pixels(E * B)

    z = batched(x, episodes=E)  # (E*B, T, D)
    _loss(z).backward()
    zs = []
    for chunk in x.split(B):  # episode-major: episode e owns videos e*B .. e*B + B - 1
        zs.append(single(chunk, episodes=1))
        _loss(zs[-1]).backward()
    torch.testing.assert_close(z, torch.cat(zs), rtol=1e-9, atol=1e-12)
    grads = 0
    for (name, p), (_, p1) in zip(batched.named_parameters(), single.named_parameters()):
        assert (p.grad is None) == (p1.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p1.grad, rtol=1e-9, atol=1e-12, msg=name)
            grads += p.grad.abs().sum() > 0
    assert grads == len(list(batched.clip.visual.parameters()))  # every visual weight got a gradient
    buffers = dict(single.named_buffers())
    for name, b in batched.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-9, atol=1e-12, msg=name)
        if name.endswith("num_batches_tracked"):
            assert int(b) == E, name
    assert not torch.allclose(pooled(x, episodes=1), z)  # one BatchNorm over all episodes differs


def test_frozen_batchnorm_uses_running_statistics(clips) -> None:
    enc = FrameEncoder(copy.deepcopy(clips["mdmf-tiny-rn"]).double(), bn="frozen").train()
    assert not any(isinstance(m, EpisodeBatchNorm2d) for m in enc.modules())
    before = _bn_state(enc.clip.visual)
    x = _pixels(B)
    z = enc(x)
    _loss(z).backward()
    for k, v in _bn_state(enc.clip.visual).items():
        assert torch.equal(v, before[k]), k
    bn1 = enc.clip.visual.layer1[0].bn1
    assert not bn1.training and bn1.weight.grad is not None and bn1.weight.grad.abs().sum() > 0  # affine trains
    assert enc.clip.visual.training  # the rest of the tower is in training mode
    with torch.no_grad():
        torch.testing.assert_close(enc.eval()(x), z.detach(), rtol=0, atol=0)


def _names(enc: FrameEncoder) -> set[str]:
    return {n for n, p in enc.clip.named_parameters() if p.requires_grad}


RN_HEAD = {"visual.attnpool."}
VIT_HEAD = {"visual.ln_post.", "visual.proj"}
CASES = [
    ("mdmf-tiny-rn", None, ("visual.",)),
    ("mdmf-tiny-rn", 0, ()),
    ("mdmf-tiny-rn", 1, ("visual.layer4.0.", "visual.attnpool.")),
    ("mdmf-tiny-rn", 2, ("visual.layer3.0.", "visual.layer4.0.", "visual.attnpool.")),
    ("mdmf-tiny-rn", 4, ("visual.layer", "visual.attnpool.")),
    ("mdmf-tiny-vit", None, ("visual.",)),
    ("mdmf-tiny-vit", 0, ()),
    ("mdmf-tiny-vit", 1, ("visual.transformer.resblocks.0.", "visual.ln_post.", "visual.proj")),
]


@pytest.mark.parametrize("model,last,prefixes", CASES, ids=[f"{m[10:]}-{n}" for m, n, _ in CASES])
def test_train_last_blocks_selects_parameters(clips, model, last, prefixes) -> None:
    enc = FrameEncoder(copy.deepcopy(clips[model]), train_last_blocks=last)
    names = [n for n, _ in enc.clip.named_parameters()]
    assert _names(enc) == {n for n in names if n.startswith(prefixes)}
    assert set(map(id, enc.trainable_parameters())) == {id(p) for p in enc.clip.parameters() if p.requires_grad}
    # frozen modules stay in eval mode when the encoder trains
    enc.train()
    for name, m in enc.clip.named_modules():
        params = list(m.parameters())
        if params and not any(True for _ in m.children()):  # leaf modules with weights
            assert m.training == any(p.requires_grad for p in params), name
    assert not enc.clip.transformer.training and not enc.clip.logit_scale.requires_grad


def test_train_text_and_bad_block_counts(clips) -> None:
    enc = FrameEncoder(copy.deepcopy(clips["mdmf-tiny-vit"]), train_last_blocks=0, train_text=True)
    text = {n for n, _ in enc.clip.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}
    assert _names(enc) == text and text
    tokens = torch.randint(1, 100, (3, 77))
    assert enc.encode_text(tokens).requires_grad
    assert not FrameEncoder(copy.deepcopy(clips["mdmf-tiny-vit"])).encode_text(tokens).requires_grad
    assert len(visual_blocks(clips["mdmf-tiny-rn"].visual)) == 4
    for bad in (-1, 5):
        with pytest.raises(ConfigError, match="has 4 blocks"):
            FrameEncoder(copy.deepcopy(clips["mdmf-tiny-rn"]), train_last_blocks=bad)
    with pytest.raises(ConfigError, match="episode, frozen"):
        FrameEncoder(copy.deepcopy(clips["mdmf-tiny-rn"]), bn="pooled")
    assert BN_MODES == ("episode", "frozen")


@pytest.mark.parametrize("model", ["mdmf-tiny-rn", "mdmf-tiny-vit"])
def test_optimizer_step_changes_only_trained_parameters(clips, model) -> None:
    enc = FrameEncoder(copy.deepcopy(clips[model]), train_last_blocks=1)
    before = {n: p.detach().clone() for n, p in enc.clip.named_parameters()}
    buffers = _bn_state(enc.clip.visual)
    opt = torch.optim.SGD(enc.trainable_parameters(), lr=0.1)
    text = enc.encode_text(torch.randint(1, 100, (2, 77)))  # (C, D) frozen
    z = enc(_pixels(2 * B, torch.float32), episodes=2)  # (2B, T, D)
    (_loss(z) + (z.mean(1) @ text.T).sum()).backward()
    opt.step()
    trained = _names(enc)
    for n, p in enc.clip.named_parameters():
        assert torch.equal(p, before[n]) != (n in trained), n
    for k, v in _bn_state(enc.clip.visual).items():  # frozen blocks (eval) keep their statistics
        assert torch.equal(v, buffers[k]) != k.startswith("layer4."), k


@pytest.mark.parametrize("model", ["mdmf-tiny-rn", "mdmf-tiny-vit"])
def test_grad_checkpointing_matches_plain_backward(clips, model) -> None:
    """Same gradients and running statistics with checkpointing (ResNet: statistics updated once)."""
    clip = copy.deepcopy(clips[model]).double()
    plain = FrameEncoder(copy.deepcopy(clip), train_last_blocks=None)
    ckpt = FrameEncoder(copy.deepcopy(clip), grad_checkpointing=True, train_text=True)
    if model == "mdmf-tiny-rn":
        assert all(isinstance(getattr(ckpt.clip.visual, s), CheckpointedStage) for s in ("layer1", "layer4"))
    else:
        assert ckpt.clip.visual.transformer.grad_checkpointing
    assert ckpt.clip.transformer.grad_checkpointing and not plain.clip.transformer.grad_checkpointing
    assert list(ckpt.clip.state_dict()) == list(plain.clip.state_dict())
    x = _pixels(2 * B)
    z, zc = plain(x, episodes=2), ckpt(x, episodes=2)
    ckpt(x[:B], episodes=1)  # another forward before backward: the recomputation keeps E=2
    _loss(z).backward()
    _loss(zc).backward()
    torch.testing.assert_close(zc, z, rtol=0, atol=0)
    for (name, p), (_, pc) in zip(plain.clip.visual.named_parameters(), ckpt.clip.visual.named_parameters()):
        torch.testing.assert_close(pc.grad, p.grad, rtol=1e-12, atol=1e-15, msg=name)
    plain(x[:B], episodes=1)
    for (name, b), (_, bc) in zip(plain.clip.named_buffers(), ckpt.clip.named_buffers()):
        torch.testing.assert_close(bc, b, rtol=1e-12, atol=1e-15, msg=name)
        if name.endswith("num_batches_tracked"):
            assert int(bc) == 3, name  # 2 episodes + 1, no recomputation counted


@pytest.mark.parametrize("model", ["mdmf-tiny-rn", "mdmf-tiny-vit"])
def test_save_clip_loads_with_load_backbone(clips, model, tmp_path) -> None:
    """A trained encoder's checkpoint loads through open_clip (strict) and embeds bit-identically."""
    enc = FrameEncoder(copy.deepcopy(clips[model]), bn="episode")
    opt = torch.optim.SGD(enc.trainable_parameters(), lr=0.1)
    _loss(enc(_pixels(2 * B, torch.float32), episodes=2)).backward()
    opt.step()
    path = enc.save_clip(tmp_path / "backbone.pt")
    assert not (tmp_path / "backbone.pt.tmp").exists()
    loaded = load_backbone(model, str(path), "cpu")
    assert loaded.weights == weights_id(str(path)) and loaded.weights.startswith("sha256:")
    assert len(loaded.weights) == len("sha256:") + 64
    assert list(loaded.model.state_dict()) == list(clips[model].state_dict())
    x = _pixels(B, torch.float32, seed=3)
    with torch.no_grad():
        z = enc.eval()(x)  # (B, T, D)
        z_loaded = loaded.model.encode_image(x.flatten(0, 1)).reshape(z.shape)
        z_untrained = clips[model].eval().encode_image(x.flatten(0, 1)).reshape(z.shape)
    assert torch.equal(z, z_loaded)
    assert not torch.allclose(z, z_untrained)  # the step changed the weights that were saved


def _bn_net() -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), EpisodeBatchNorm2d(4), nn.ReLU(), EpisodeBatchNorm2d(4, momentum=None))
    return net.double().train()


def _run_episodes(net: nn.Module, x: torch.Tensor, episodes: int) -> None:
    for m in net.modules():
        if isinstance(m, EpisodeBatchNorm2d):
            m.episodes = episodes
    net(x)


def test_merged_running_stats_of_two_ranks_equal_one_process() -> None:
    """Two ranks, each running 2 of the 4 episodes of an update from the same state, merged as
    merge_running_stats does after its all_gather: the running statistics of one process running all 4
    (momentum 0.1 and cumulative), over two updates. (The all_gather itself is torch.distributed's.)"""
    from mdmf_cache.distributed import _apply_merged, _local_stats, running_stats_snapshot

    x = torch.randn(2, 4 * 2, 3, 6, 6, dtype=torch.float64)  # 2 updates x 4 episodes of 2 images
    ranks, single = [_bn_net(), _bn_net()], _bn_net()
    for step in range(2):
        snapshot = running_stats_snapshot(ranks[0])
        for rank, share in zip(ranks, x[step].split(4)):  # consecutive shares in rank order
            _run_episodes(rank, share, 2)
        unmerged = ranks[0].state_dict()["1.running_mean"].clone()
        gathered = torch.stack([_local_stats(r, snapshot) for r in ranks])  # (W, L), the all_gather
        for r in ranks:
            _apply_merged(r, snapshot, gathered)
        _run_episodes(single, x[step], 4)
        for r in ranks:
            for key, value in single.state_dict().items():
                torch.testing.assert_close(r.state_dict()[key], value, rtol=1e-12, atol=1e-12, msg=key)
        assert not torch.allclose(unmerged, ranks[0].state_dict()["1.running_mean"])
    assert int(ranks[0].state_dict()["3.num_batches_tracked"]) == 8
