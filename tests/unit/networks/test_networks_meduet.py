"""meduet.networks.latent_vit / meduet.networks.meduet: shapes, positions, mixing/demixing, decoder streams,
style smoothing, the MAE baseline and the downstream ``encode`` API (tiny networks, real computations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meduet.networks.latent_vit import (
    LatentViT,
    patchify,
    sincos_position_embedding_3d,
    token_grid,
    unpatchify,
)
from meduet.networks.factors import StyleSmoothing, pool_style
from meduet.networks.mae import MaskedAutoencoder, build_mae
from meduet.networks.masks import sample_mix_mask, sample_visible_mask
from meduet.networks.meduet import MEDUET_PRESETS, MeDUET, build_meduet


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw) -> MeDUET:
    torch.manual_seed(0)
    return build_meduet("tiny", num_domains=3, **kw)


def _pre_hook(module, store: list):
    def hook(m, args):
        store.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])

    return module.register_forward_pre_hook(hook)


# ------------------------------------------------------------------------------------------------ patches/positions
@pytest.mark.parametrize("shape", [(2, 4, 8, 8, 8), (3, 4, 8, 12, 16)])
def test_patchify_roundtrip_and_token_order(shape):
    x = torch.randn(shape)
    p = 4
    patches = patchify(x, p)
    grid = token_grid(shape[2:], p)
    assert patches.shape == (shape[0], grid[0] * grid[1] * grid[2], shape[1] * p**3)
    assert torch.equal(unpatchify(patches, p, grid, shape[1]), x)
    # same token order and patch layout as the Conv3d patch embedding
    enc = LatentViT(in_channels=4, input_size=shape[2:], patch_size=p, dim=12, depth=1, num_heads=2)
    conv = enc.patch_embed(x).flatten(2).transpose(1, 2)
    lin = patches @ enc.patch_embed.weight.reshape(12, -1).t() + enc.patch_embed.bias
    torch.testing.assert_close(conv, lin, rtol=1e-4, atol=1e-5)


def test_positions_are_fixed_buffers():
    model = _model()
    enc = model.encoder
    buffers = dict(model.named_buffers())
    params = dict(model.named_parameters())
    assert "backbone.encoder.pos_embed" in buffers and "decoder.pos_embed" in buffers
    assert not any("pos" in name for name in params)
    assert not any("pos_embed" in key for key in model.state_dict())  # non-persistent: checkpoints are crop-size free
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0], sincos_position_embedding_3d((4, 4, 4), 32))
    # distinct positions, and other grids are computed (not learned)
    pe = enc.positions((2, 3, 4))
    assert pe.shape == (1, 24, 32) and not pe.requires_grad
    assert torch.unique(pe[0], dim=0).shape[0] == 24
    # a training step leaves them untouched
    before = enc.pos_embed.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    out = model(torch.randn(4, 4, 8, 8, 8), streams=2)
    out["pred"].pow(2).mean().backward()
    opt.step()
    assert torch.equal(enc.pos_embed, before)


def test_sincos_split_over_axes():
    pe = sincos_position_embedding_3d((2, 3, 4), 32)  # 2 * (32 // 6) = 10 channels per axis, 2 zero channels
    assert pe.shape == (24, 32)
    assert torch.all(pe[:, 30:] == 0)
    grid = pe.reshape(2, 3, 4, 32)
    # axis-1 channels depend only on the first coordinate
    assert torch.allclose(grid[:, 0, 0, :10], grid[:, 2, 3, :10])
    assert not torch.allclose(grid[0, 0, 0, 10:20], grid[0, 1, 0, 10:20])


# ------------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_preset_shapes(preset):
    torch.manual_seed(0)
    cfg = MEDUET_PRESETS[preset]
    model = build_meduet(preset, num_domains=5)
    s, p, d = cfg["input_size"], cfg["patch_size"], cfg["dim"]
    ds, n, k = d // 4, (cfg["input_size"] // cfg["patch_size"]) ** 3, 2
    dv = 2 * ds  # tiny and demo pool style as [mean, std]
    assert model.style_vector_dim == dv
    x = torch.randn(2 * k, 4, s, s, s)
    out = model(x, streams=4, reencode=4)
    assert out["mix_mask"].shape == (k, n) and out["visible"].shape == (2 * k, n)
    assert out["content_tokens"].shape == (k, n, d) and out["style_tokens"].shape == (k, n, ds)
    assert out["content"].shape == (2 * k, d) and out["style"].shape == (2 * k, dv)
    assert out["domain_content_logits"].shape == out["domain_style_logits"].shape == (2 * k, 5)
    assert out["pred"].shape == (4 * k, n, 4 * p**3)
    assert out["view_content_tokens"].shape == (4 * k, n, d) and out["view_style_tokens"].shape == (4 * k, n, ds)
    assert out["view_content"].shape == (4 * k, d) and out["view_style"].shape == (4 * k, dv)
    enc = model.encode(x)
    g = s // p
    assert enc["tokens"].shape == enc["content_tokens"].shape == (2 * k, n, d)
    assert enc["style_tokens"].shape == (2 * k, n, ds)
    assert enc["content"].shape == (2 * k, d) and enc["style"].shape == (2 * k, dv)
    assert enc["content_map"].shape == (2 * k, d, g, g, g)


def test_paper_preset_sizes():
    cfg = MEDUET_PRESETS["paper"]
    assert (cfg["dim"], cfg["depth"], cfg["num_heads"], cfg["dec_dim"], cfg["dec_depth"], cfg["patch_size"]) == (
        768, 12, 12, 384, 8, 4)
    assert cfg["input_size"] // cfg["patch_size"] == 6  # 216 tokens on 4x24^3 latents


def test_blocks_use_sdpa_attention(monkeypatch):
    model = _model()
    blocks = list(model.encoder.blocks) + list(model.decoder.blocks)
    for block in blocks:
        assert block.attn.use_flash_attention and block.attn.qkv.bias is not None
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8, 8), streams=2)
    assert len(calls) == len(blocks)  # MONAI's SABlock calls torch's SDPA in every block


def test_encode_non_cubic_grid():
    model = _model()
    x = torch.randn(2, 4, 8, 12, 16)  # grid (4, 6, 8) with p = 2
    enc = model.encode(x)
    assert enc["tokens"].shape == (2, 192, 32)
    assert enc["content_map"].shape == (2, 32, 4, 6, 8)
    torch.testing.assert_close(enc["content_map"].flatten(2).transpose(1, 2), enc["content_tokens"])
    torch.testing.assert_close(enc["content"], enc["content_tokens"].mean(1))
    assert enc["style_tokens"].shape == (2, 192, 8)
    # training forward on the same grid
    out = model(x, streams=4, reencode=4)
    assert out["pred"].shape == (4, 192, 4 * 8)
    mae = build_mae("tiny")
    e = mae.encode(x)
    assert e["content_map"].shape == (2, 32, 4, 6, 8) and e["style"] is None and e["style_tokens"] is None


# ------------------------------------------------------------------------------------------------ mixing
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.3])
def test_mix_mask_has_exact_counts(ratio):
    m = sample_mix_mask(5, 64, ratio, generator=torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == (5, 64)
    assert torch.all(m.sum(1) == int(ratio * 64 + 0.5))
    assert not torch.equal(m[0], m[1])
    v = sample_visible_mask(3, 64, ratio)
    assert torch.all((~v).sum(1) == int(ratio * 64 + 0.5))


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.001])
def test_mix_ratio_must_leave_tokens_to_both(ratio):
    with pytest.raises(ValueError):
        sample_mix_mask(2, 64, ratio)


def _hand_masks(k: int, n: int) -> torch.Tensor:
    """Distinct masks per pair (so using another pair's mask is detectable), 1/4 ... of positions for A."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randperm(n, generator=g) < (n // 4) * (i + 1) for i in range(k)]
    return torch.stack(rows)


def test_encoder_sees_mixed_sequence():
    model = _model()
    k, n = 3, 64
    x = torch.randn(2 * k, 4, 8, 8, 8)
    mask = _hand_masks(k, n)
    seen: list = []
    h = _pre_hook(model.encoder.blocks[0], seen)
    model(x, mask, streams=0, domain_content=False, domain_style=False)
    h.remove()
    assert len(seen) == 1
    mixed = seen[0][0]
    tokens, _ = model.encoder.embed(x)
    assert mixed.shape == (k, n, 32)
    for i in range(k):
        torch.testing.assert_close(mixed[i][mask[i]], tokens[i][mask[i]].detach())
        torch.testing.assert_close(mixed[i][~mask[i]], tokens[k + i][~mask[i]].detach())


def test_decoder_streams_use_own_positions_and_complementary_mask():
    """Stream A = recombined tokens at A's positions, mask token elsewhere; stream B = the same with the
    complement of *the same pair's* mask (the public code used another sample's mask here)."""
    model = _model()
    k, n = 3, 64
    x = torch.randn(2 * k, 4, 8, 8, 8)
    mask = _hand_masks(k, n)
    assert not torch.equal(mask[0], mask[2])  # a mask taken from the wrong pair would differ
    dec_args: list = []
    block_in: list = []
    h1 = _pre_hook(model.decoder, dec_args)
    h2 = _pre_hook(model.decoder.blocks[0], block_in)
    with torch.no_grad():
        model(x, mask, streams=2)
    h1.remove(), h2.remove()
    tokens, visible, grid = dec_args[0]
    h = block_in[0][0]
    assert h.shape == (2 * k, n, 32) and visible.shape == (2 * k, n)
    dec = model.decoder
    mask_tok = (dec.mask_token[0, 0] + dec.pos_embed[0]).detach()  # (N, Dd)
    with torch.no_grad():
        embedded = dec.embed(tokens) + dec.pos_embed
    for i in range(k):
        a, b = i, k + i
        assert torch.equal(visible[a], mask[i]) and torch.equal(visible[b], ~mask[i])
        # A's stream: real tokens exactly at A's positions
        torch.testing.assert_close(h[a][~mask[i]], mask_tok[~mask[i]])
        torch.testing.assert_close(h[a][mask[i]], embedded[a][mask[i]])
        assert not torch.allclose(h[a][mask[i]], mask_tok[mask[i]])
        # B's stream: real tokens exactly at B's positions = complement of the same pair's mask
        torch.testing.assert_close(h[b][mask[i]], mask_tok[mask[i]])
        torch.testing.assert_close(h[b][~mask[i]], embedded[b][~mask[i]])
        assert not torch.allclose(h[b][~mask[i]], mask_tok[~mask[i]])


def test_swap_streams_use_other_source_pooled_style():
    model = _model()
    k, n = 2, 64
    x = torch.randn(2 * k, 4, 8, 8, 8)
    mask = _hand_masks(k, n)
    dec_args: list = []
    hook = _pre_hook(model.decoder, dec_args)
    with torch.no_grad():
        out = model(x, mask, streams=4)
    hook.remove()
    tokens, visible = dec_args[0][0], dec_args[0][1]
    assert tokens.shape == (4 * k, n, 32)
    with torch.no_grad():
        for i in range(k):
            # the swap broadcasts the mean part of the other source's pooled style ([mean, std] here)
            ds = model.style_dim
            swap_a = model.recombine(out["content_tokens"][i], out["style"][k + i, :ds].expand(n, -1))
            swap_b = model.recombine(out["content_tokens"][i], out["style"][i, :ds].expand(n, -1))
            torch.testing.assert_close(tokens[2 * k + i][mask[i]], swap_a[mask[i]])
            torch.testing.assert_close(tokens[3 * k + i][~mask[i]], swap_b[~mask[i]])
            rec = model.recombine(out["content_tokens"][i], out["style_tokens"][i])
            torch.testing.assert_close(tokens[i], rec)
    assert torch.equal(visible[2 * k:3 * k], mask) and torch.equal(visible[3 * k:], ~mask)


def _stats(tokens):
    return torch.cat([tokens.mean(0), (tokens.var(0, unbiased=False) + 1e-6).sqrt()])


@pytest.mark.parametrize("style_pool", ["mean", "mean_std"])
def test_pooled_factors_are_statistics_over_own_positions(style_pool):
    model = build_meduet("tiny", num_domains=3, style_pool=style_pool)
    k = 2
    mask = _hand_masks(k, 64)
    with torch.no_grad():
        out = model(torch.randn(2 * k, 4, 8, 8, 8), mask, streams=0)
    pool = (lambda t: t.mean(0)) if style_pool == "mean" else _stats
    assert out["style"].shape[1] == model.style_vector_dim == model.style_dim * (1 if style_pool == "mean" else 2)
    assert model.domain_style_head.in_features == model.style_vector_dim
    for i in range(k):
        torch.testing.assert_close(out["content"][i], out["content_tokens"][i][mask[i]].mean(0))
        torch.testing.assert_close(out["content"][k + i], out["content_tokens"][i][~mask[i]].mean(0))
        torch.testing.assert_close(out["style"][i], pool(out["style_tokens"][i][mask[i]]))
        torch.testing.assert_close(out["style"][k + i], pool(out["style_tokens"][i][~mask[i]]))


def test_style_std_separates_what_the_mean_cannot():
    # two token sets with the same mean but different spread: only mean_std tells them apart
    a = torch.tensor([[[1.0], [1.0], [1.0], [1.0]]])
    b = torch.tensor([[[0.0], [2.0], [0.0], [2.0]]])
    assert torch.equal(pool_style(a, None, "mean"), pool_style(b, None, "mean"))
    sa, sb = pool_style(a, None, "mean_std"), pool_style(b, None, "mean_std")
    assert sa[0, 1] < 1e-2 and abs(float(sb[0, 1]) - 1.0) < 1e-5
    with pytest.raises(ValueError, match="style_pool"):
        pool_style(a, None, "max")


# ------------------------------------------------------------------------------------------------ style smoothing
def test_style_smoothing_never_mixes_sources():
    torch.manual_seed(0)
    smooth = StyleSmoothing(6)
    with torch.no_grad():
        smooth.log_weight.normal_()  # a non-uniform learned kernel
    k, grid = 3, (4, 4, 4)
    mask = _hand_masks(k, 64)
    style = torch.randn(k, 64, 6)
    out = smooth(style, mask, grid)
    perturbed = torch.where(mask.unsqueeze(-1), style, style + 100 * torch.randn_like(style))
    out2 = smooth(perturbed, mask, grid)
    assert torch.equal(out[mask], out2[mask])  # exactly: B's tokens never enter A's
    assert torch.all(out[~mask] == 0)
    assert not torch.allclose(out[mask], style[mask])  # it does smooth over A's own neighbours
    # a constant field stays constant (normalised weights), borders included
    const = smooth(torch.ones(1, 64, 6), None, grid)
    torch.testing.assert_close(const, torch.ones_like(const))


def test_model_style_of_a_ignores_source_b_tokens():
    model = _model()
    k = 2
    mask = _hand_masks(k, 64)
    x = torch.randn(2 * k, 4, 8, 8, 8)

    def run(noise: float):
        def hook(module, args, output):
            return torch.where(mask.unsqueeze(-1), output, output + noise)

        h = model.factors.style.register_forward_hook(hook)
        with torch.no_grad():
            out = model(x, mask, streams=0, domain_content=False, domain_style=False)
        h.remove()
        return out

    base, noisy = run(0.0), run(5.0)
    assert torch.equal(base["style_tokens"][mask], noisy["style_tokens"][mask])
    torch.testing.assert_close(base["style"][:k], noisy["style"][:k], rtol=0, atol=0)
    assert not torch.allclose(base["style"][k:], noisy["style"][k:])


def test_smoothing_kernel_is_learned():
    model = _model()
    out = model(torch.randn(4, 4, 8, 8, 8), streams=0)
    out["style"].pow(2).sum().backward()
    g = model.factors.smooth.log_weight.grad
    assert g is not None and g.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ re-encoding
def test_reencoded_views_are_student_encodings_of_reconstructions():
    model = _model()
    k = 2
    x = torch.randn(2 * k, 4, 8, 8, 8)
    with torch.no_grad():
        out = model(x, streams=4, reencode=4)
        views = unpatchify(out["pred"], 2, (4, 4, 4), 4)
        enc = model.encode(views)
    torch.testing.assert_close(out["view_content"], enc["content"])
    torch.testing.assert_close(out["view_style_tokens"], enc["style_tokens"])


def test_bad_batch_and_mask_rejected():
    model = _model()
    with pytest.raises(ValueError):
        model(torch.randn(3, 4, 8, 8, 8))
    with pytest.raises(ValueError):
        model(torch.randn(4, 4, 8, 8, 8), torch.ones(2, 64))  # not bool
    with pytest.raises(ValueError):
        model.encode(torch.randn(1, 4, 8, 8, 7))


# ------------------------------------------------------------------------------------------------ MAE baseline
def test_mae_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    mae = build_mae("tiny")
    assert isinstance(mae, MaskedAutoencoder)
    x = torch.randn(3, 4, 8, 8, 8)
    seen: list = []
    dec_in: list = []
    h1 = _pre_hook(mae.encoder.blocks[0], seen)
    h2 = _pre_hook(mae.decoder, dec_in)
    out = mae(x)
    h1.remove(), h2.remove()
    vis = out["visible"]
    assert torch.all(vis.sum(1) == 32)
    assert seen[0][0].shape == (3, 32, 32)
    tokens, _ = mae.encoder.embed(x)
    for i in range(3):
        torch.testing.assert_close(seen[0][0][i], tokens[i][vis[i]].detach())
    assert torch.equal(dec_in[0][1], vis)
    assert torch.all(dec_in[0][0][~vis] == 0)  # hidden positions carry no encoder output
    assert out["pred"].shape == (3, 64, 32)
    e = mae.encode(x)
    assert e["tokens"].shape == (3, 64, 32) and e["content"].shape == (3, 32) and e["style"] is None


def test_render_decodes_factors_in_the_mode_the_decoder_was_trained_for():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=2).eval()
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        enc = model.encode(x)
        grid = enc["content_map"].shape[2:]
        one_pass = model.render(enc["content_tokens"], enc["style_tokens"], grid, as_hidden=False)
        tokens = model.recombine(enc["content_tokens"], enc["style_tokens"])
        torch.testing.assert_close(one_pass, unpatchify(model.decoder(tokens, None, grid), 2, grid, 4))
        # as hidden: each patch comes from the decoder pass in which its position was masked
        g = torch.Generator().manual_seed(3)
        hidden = model.render(enc["content_tokens"], enc["style_tokens"], grid, generator=g)
        g = torch.Generator().manual_seed(3)
        vis = sample_mix_mask(2, 64, 0.5, generator=g)
        first = unpatchify(model.decoder(tokens, vis, grid), 2, grid, 4)
        second = unpatchify(model.decoder(tokens, ~vis, grid), 2, grid, 4)
        got, a, b = patchify(hidden, 2), patchify(first, 2), patchify(second, 2)
        torch.testing.assert_close(got[~vis], a[~vis])
        torch.testing.assert_close(got[vis], b[vis])
        # a pooled style vector is broadcast over the tokens; the meta record picks the mode
        pooled = model.render(enc["content_tokens"], enc["style"], grid, as_hidden=False)
        assert pooled.shape == x.shape
        model.meta = {"rec_on": "all"}
        torch.testing.assert_close(model.render(enc["content_tokens"], enc["style_tokens"], grid), one_pass)


# ------------------------------------------------------------------------------------------------ content eraser
def test_content_eraser_is_identity_until_set_and_applies_the_affine_map():
    from meduet.metrics.disentanglement import LinearEraser

    model = _model()
    x = torch.randn(2, 4, 8, 8, 8)
    with torch.no_grad():
        before = model.encode(x)
        rng = np.random.default_rng(0)
        mean, a = rng.normal(size=32), rng.normal(size=(32, 32)) * 0.1
        model.factors.eraser.set(torch.from_numpy(mean), torch.from_numpy(a))
        after = model.encode(x)
        raw = model.encode(x, erase=False)
    torch.testing.assert_close(raw["content_tokens"], before["content_tokens"])  # erase=False: the head alone
    torch.testing.assert_close(after["style"], before["style"])  # style untouched
    want = LinearEraser(mean, a)(before["content_tokens"].double().numpy().reshape(-1, 32)).reshape(2, -1, 32)
    np.testing.assert_allclose(after["content_tokens"].numpy(), want, atol=1e-5)
    torch.testing.assert_close(after["content"], after["content_tokens"].mean(1))  # pooled = mean of erased tokens
    # it travels in the state dict; a state dict from before the eraser existed loads as identity
    state = model.state_dict()
    other = _model()
    other.load_state_dict(state)
    assert bool(other.factors.eraser.fitted) and torch.equal(other.factors.eraser.proj, model.factors.eraser.proj)
    legacy = {k: v for k, v in state.items() if ".eraser." not in k}
    other.load_state_dict(legacy)
    assert not bool(other.factors.eraser.fitted)
    with torch.no_grad():
        torch.testing.assert_close(other.encode(x)["content"], before["content"])
