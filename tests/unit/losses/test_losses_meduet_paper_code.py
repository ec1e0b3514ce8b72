"""The public MeDUET code's forms as options (``paper`` preset): both-way pairing, MSE MFTD summed over sources,
SiQC keys from the teacher's own swap, token-wise style swap, layer-norm pooling, sample style labels, the EMA of the
whole student and the optimiser's weight-decay groups (tiny networks, real computations)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from meduet.engines.ema import EMATeacher
from meduet.engines.pretrain import optimizer_param_groups
from meduet.errors import MeduetConfigError
from meduet.losses.meduet import mftd_loss, siqc_view_labels, supcon_loss
from meduet.losses.meduet_config import MeDUETLossConfig
from meduet.losses.meduet_step import meduet_step_losses, pairing_source
from meduet.networks.latent_vit import patchify
from meduet.networks.meduet import MeDUET, build_meduet, swapped_style_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER_CODE = dict(MeDUETLossConfig.PAPER_CODE_FORMS, mftd_start_step=0)
CONFIGS = Path(__file__).resolve().parents[3] / "bundles/meduet_pretrain/configs"


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dom = torch.arange(n) % 3
    return torch.randn(n, 4, 8, 8, 8, generator=g) + dom[:, None, None, None, None], dom


def _spy_forward(model: MeDUET, store: list):
    return model.register_forward_hook(lambda m, args, out: store.append((args[0].detach(), out["mix_mask"])))


# ------------------------------------------------------------------------------------------------ pairing
def test_pairing_source_rows():
    assert pairing_source(4, "one_way") is None
    # sequences 0..3: A = 0, 1, 2, 3 and B = 2, 3, 0, 1 (each pair once each way)
    assert pairing_source(4, "both_ways").tolist() == [0, 1, 2, 3, 2, 3, 0, 1]
    with pytest.raises(MeduetConfigError, match="pairing"):
        pairing_source(4, "flip")


def test_both_ways_gives_2k_sequences_with_independent_complementary_masks():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    x, dom = _batch(4)
    seen: list = []
    hook = _spy_forward(model, seen)
    cfg = {"pairing": "both_ways", "use_mftd": False, "use_siqc": False}
    agree = []
    for i in range(30):
        meduet_step_losses(model, None, x, dom, 0, cfg, generator=torch.Generator().manual_seed(i))
        rows, mask = seen[-1]
        assert rows.shape[0] == 8 and mask.shape == (4, 64)  # 2K = 4 mixed sequences from a batch of 4
        # sequence j: A = sample j, B = sample (j + 2) mod 4
        torch.testing.assert_close(rows, x[[0, 1, 2, 3, 2, 3, 0, 1]])
        assert (mask.sum(1) == 32).all()
        # the two ways of a pair (sequences j and j + 2) have their own masks: neither equal nor complementary
        agree += [(mask[j] == mask[j + 2]).float().mean().item() for j in range(2)]
    hook.remove()
    assert all(0.0 < a < 1.0 for a in agree)
    assert abs(sum(agree) / len(agree) - 0.5) < 0.05  # independent draws agree on half the positions on average
    one_way: list = []
    hook = _spy_forward(model, one_way)
    meduet_step_losses(model, None, x, dom, 0, {"use_mftd": False, "use_siqc": False})
    hook.remove()
    assert one_way[0][1].shape == (2, 64)


def test_both_ways_rec_is_each_source_hidden_mse_of_every_sequence():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    x, dom = _batch(4)
    mask = torch.rand(4, 64).argsort(1) < 32
    cfg = {"pairing": "both_ways", "use_domain_content": False, "use_domain_style": False, "use_mftd": False,
           "use_siqc": False}
    losses = meduet_step_losses(model, None, x, dom, 0, cfg, mix_mask=mask)
    rows = x[[0, 1, 2, 3, 2, 3, 0, 1]]
    with torch.no_grad():
        pred = model(rows, mask, streams=2, domain_content=False, domain_style=False)["pred"]
    err = (pred - patchify(rows, 2)).pow(2).mean(-1)  # (8, 64): A streams then B streams
    hidden = torch.cat([~mask, mask])
    expected = 0.5 * (err[:4][hidden[:4]].mean() + err[4:][hidden[4:]].mean())
    torch.testing.assert_close(losses["rec"].detach(), expected)


# ------------------------------------------------------------------------------------------------ MFTD
def test_mse_mftd_summed_over_sources_equals_hand_computation():
    # K = 1 pair, N = 3 tokens, D = 2 content features, Ds = 1 style feature; A hidden at token 2, B at 0 and 1
    sc = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]], [[1.0, 1.0], [3.0, 0.0], [0.0, 0.0]]])
    tc = torch.zeros_like(sc)
    ss = torch.tensor([[[0.0], [0.0], [1.0]], [[2.0], [0.0], [5.0]]])
    ts = torch.zeros_like(ss)
    hidden = torch.tensor([[False, False, True], [True, True, False]])
    # content: A token 2: (4 + 4) / 2 = 4; B tokens 0, 1: mean((1+1)/2, 9/2) = 2.75; style: A 1, B mean(4, 0) = 2
    out = mftd_loss(sc, ss, tc, ts, hidden, "mse", content_weight=0.5, style_weight=1.0, reduction="sum")
    torch.testing.assert_close(out, torch.tensor(0.5 * (4.0 + 2.75) + (1.0 + 2.0)))
    mean = mftd_loss(sc, ss, tc, ts, hidden, "mse", content_weight=0.5, style_weight=1.0, reduction="mean")
    torch.testing.assert_close(mean, out / 2)


# ------------------------------------------------------------------------------------------------ SiQC
def test_token_wise_style_swap_pairs_sources_by_rank():
    mask = torch.tensor([[True, False, False, True]])  # A at 0, 3; B at 1, 2
    style = torch.arange(4.0).view(1, 4, 1) * torch.tensor([1.0, 10.0])
    out = swapped_style_tokens(style, mask)
    # A's 1st position (0) gets B's 1st token (1), A's 2nd (3) gets B's 2nd (2), and B's get A's
    assert out[0, :, 0].tolist() == [1.0, 0.0, 3.0, 2.0]
    assert out.shape == style.shape
    with pytest.raises(ValueError, match="as many A as B"):
        swapped_style_tokens(style, torch.tensor([[True, True, True, False]]))


def test_token_swap_streams_decode_content_with_the_other_sources_style_tokens():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    x, _ = _batch(4)
    mask = torch.rand(2, 64).argsort(1) < 32
    with torch.no_grad():
        out = model(x, mask, streams=4, style_swap="tokens", domain_content=False, domain_style=False)
        c, s = out["content_tokens"], out["style_tokens"]
        swapped = model.recombine(c, swapped_style_tokens(s, mask))
        expected = model.decoder(torch.cat([swapped, swapped]), torch.cat([mask, ~mask]), (4, 4, 4))
    torch.testing.assert_close(out["pred"][4:], expected)
    pooled = model(x, mask, streams=4, style_swap="pooled", domain_content=False, domain_style=False)["pred"]
    assert not torch.allclose(pooled[4:], out["pred"][4:])


def test_swapped_teacher_keys_have_the_token_shape_and_use_the_complementary_mask():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    teacher = EMATeacher(model, scope="student")
    x, dom = _batch(4)
    mask = torch.rand(4, 64).argsort(1) < 32
    calls = []
    original = teacher.module.swapped_keys

    def spy(rows, mix_mask, style_swap, extra):
        calls.append(mix_mask)
        res = original(rows, mix_mask, style_swap, extra)
        calls.append(res)
        return res

    teacher.module.swapped_keys = spy
    losses = meduet_step_losses(model, teacher, x, dom, 0, PAPER_CODE, mix_mask=mask)
    assert torch.equal(calls[0], ~mask)  # the teacher mixes with the student's complement
    res = calls[1]
    # token-wise style maps: one style token per position of each swapped view, and per-token content
    assert res["view_style_tokens"].shape == (8, 64, model.style_dim)
    assert res["view_content_tokens"].shape == (8, 64, model.dim)
    assert res["style_tokens"].shape == (4, 64, model.style_dim)
    assert torch.isfinite(losses["siqc"]) and losses["siqc"] > 0
    with pytest.raises(MeduetConfigError, match="ema_scope: student"):
        meduet_step_losses(model, EMATeacher(model), x, dom, 0, PAPER_CODE, mix_mask=mask)


def test_supcon_exclude_self_drops_each_querys_own_key():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    k = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 0.9]])
    labels = torch.tensor([0, 0, 1])
    out = supcon_loss(q, k, labels, labels, 0.5, exclude_self=True)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = qn @ kn.t() / 0.5
    # query 0: keys 1, 2 (own key 0 out), positive key 1; query 1: keys 0, 2, positive 0; query 2: no positive
    l0 = -(logits[0, 1] - torch.logsumexp(logits[0, [1, 2]], 0))
    l1 = -(logits[1, 0] - torch.logsumexp(logits[1, [0, 2]], 0))
    torch.testing.assert_close(out, (l0 + l1) / 2)


def test_view_labels_of_both_way_pairs():
    source = pairing_source(4, "both_ways")
    dom = torch.tensor([0, 1, 2, 0])
    content, style = siqc_view_labels(source, dom, style_labels="sample")
    # views [A, B, A<-sB, B<-sA] of sequences 0..3 (A = 0..3, B = 2, 3, 0, 1)
    assert content.tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3, 0, 1]
    assert style.tolist() == [0, 1, 2, 3, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3]
    _, by_site = siqc_view_labels(source, dom, style_labels="domain")
    assert by_site.tolist() == dom[style].tolist()


def test_paper_code_step_trains_and_learns_the_temperature():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3, learn_temperature=True)
    teacher = EMATeacher(model, scope="student")
    opt = torch.optim.AdamW(optimizer_param_groups(model, 0.01, decay_bias_and_norm=False), lr=3e-3)
    x, dom = _batch(6)
    first = None
    tau0 = model.temperature().detach().clone()
    for step in range(12):
        losses = meduet_step_losses(model, teacher, x, dom, step, PAPER_CODE)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        teacher.update(model, step, 100)
        first = first if first is not None else float(losses["loss"])
    assert set(losses) >= {"rec", "domain_content", "domain_style", "mftd", "siqc"}
    assert float(losses["loss"]) < first
    assert not torch.equal(model.temperature().detach(), tau0)


def test_aux_pairs_with_paper_forms():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    teacher = EMATeacher(model, scope="student")
    x, dom = _batch(4)
    losses = meduet_step_losses(model, teacher, x, dom, 0, dict(PAPER_CODE, aux_pair_fraction=0.5))
    assert torch.isfinite(losses["loss"])


def test_token_style_swap_needs_half_mixing():
    with pytest.raises(MeduetConfigError, match="style_swap"):
        MeDUETLossConfig(style_swap="tokens", mix_ratio=0.4)
    with pytest.raises(MeduetConfigError, match="siqc_keys"):
        MeDUETLossConfig(siqc_keys="teacher")


# ------------------------------------------------------------------------------------------------ EMA, optimiser
def test_whole_student_ema_moves_the_decoder_too():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3)
    whole, backbone = EMATeacher(model, scope="student"), EMATeacher(model)
    assert not hasattr(backbone.module, "decoder") and hasattr(whole.module, "decoder")
    old = {n: p.detach().clone() for n, p in whole.module.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    m = whole.update(model, 0, 100)
    for name in ("decoder.pred.weight", "recombine.proj.weight", "domain_style_head.weight",
                 "backbone.factors.content.weight"):
        student = dict(model.named_parameters())[name]
        torch.testing.assert_close(dict(whole.module.named_parameters())[name], m * old[name] + (1 - m) * student)
    decoder_names = [n for n in old if n.startswith("decoder.")]
    assert decoder_names
    moved = dict(whole.module.named_parameters())
    assert all(not torch.equal(moved[n], old[n]) for n in decoder_names)
    with pytest.raises(ValueError, match="ema_scope"):
        EMATeacher(model, scope="decoder")


def test_weight_decay_groups_exclude_biases_and_norm_weights():
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3, learn_temperature=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer_param_groups(model, 0.05, decay_bias_and_norm=False)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    dd = {names[id(p)] for p in decay["params"]}
    assert "log_tau" in nd and any(n.endswith(".bias") for n in nd)
    assert any("norm" in n and n.endswith(".weight") for n in nd)  # layer-norm weights
    assert all(not n.endswith(".bias") for n in dd) and "decoder.pred.weight" in dd
    assert len(nd) + len(dd) == len(list(model.parameters()))
    # really: with zero gradients, AdamW shrinks the decayed weights only
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([decay, no_decay], lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    for n in nd:
        assert torch.equal(after[n], before[n]), n
    for n in dd:
        torch.testing.assert_close(after[n].detach(), before[n] * (1 - 0.1 * 0.05))
    # the default: one group, every parameter decayed (as torch.optim.AdamW(model.parameters()) does)
    (single,) = optimizer_param_groups(model, 0.05)
    assert len(single["params"]) == len(list(model.parameters())) and single["weight_decay"] == 0.05


# ------------------------------------------------------------------------------------------------ presets
def _parse(preset: str | None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml")] + ([str(CONFIGS / "presets" / f"{preset}.yaml")] if preset else []))
    return parser


def test_paper_preset_follows_the_public_code_and_the_others_keep_the_project_forms():
    paper = _parse("paper")
    cfg = MeDUETLossConfig.from_mapping(paper["loss"])
    for key, value in MeDUETLossConfig.PAPER_CODE_FORMS.items():
        assert getattr(cfg, key) == value, key
    assert paper["ema_scope"] == "student" and paper["decay_bias_and_norm"] is False
    assert paper["model_overrides"]["learn_temperature"] is True
    for preset in (None, "tiny", "demo"):
        other = _parse(preset)
        cfg = MeDUETLossConfig.from_mapping(other["loss"])
        assert (cfg.pairing, cfg.siqc_keys, cfg.mftd_distance, cfg.style_swap) == ("one_way", "unmixed", "cosine",
                                                                                   "pooled"), preset
        assert other["ema_scope"] == "backbone" and other["decay_bias_and_norm"] is True
        assert not other["model_overrides"].get("learn_temperature", False)
