"""meduet.losses.meduet and meduet.engines.ema: each objective, the full step, the EMA teacher, ablations
(tiny networks, real computations and optimisation steps)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from meduet.engines.ema import EMATeacher, cosine_momentum
from meduet.errors import MeduetConfigError
from meduet.losses.meduet import domain_losses, dual_reconstruction_loss, mftd_loss, siqc_labels, siqc_loss, supcon_loss
from meduet.losses.meduet_config import MeDUETLossConfig
from meduet.losses.meduet_step import mae_step_losses, meduet_step_losses
from meduet.networks.latent_vit import patchify
from meduet.networks.layers import grad_reverse
from meduet.networks.mae import build_mae
from meduet.networks.meduet import MeDUET, build_meduet
from meduet.networks.meduet_extras import MeduetExtras


pytestmark = pytest.mark.usefixtures("one_thread")


OFFSETS = torch.tensor([[1.5, 0.0, 0.0, -1.0], [0.0, 1.5, -1.0, 0.0], [-1.0, 0.0, 1.5, 0.5]])


def _toy_batch(pairs: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random "anatomy" (content) + a per-domain channel offset (style); pairs mix different domains."""
    g = torch.Generator().manual_seed(seed)
    content = F.avg_pool3d(torch.randn(2 * pairs, 4, 8, 8, 8, generator=g), 3, stride=1, padding=1) * 2
    k = torch.arange(pairs)
    dom = torch.cat([k % 3, (k + 1) % 3])
    return content + OFFSETS[dom][:, :, None, None, None], dom


def _setup(**model_kw) -> tuple[MeDUET, EMATeacher]:
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3, **model_kw)
    return model, EMATeacher(model)


def _calls(module: torch.nn.Module, store: list):
    return module.register_forward_hook(lambda m, args, out: store.append(args[0].shape[0]))


ALL_ON = {"mftd_start_step": 0}


# ------------------------------------------------------------------------------------------------ reconstruction
def test_dual_reconstruction_scores_each_source_where_it_was_hidden():
    k, n, p = 2, 64, 32
    mask = torch.rand(k, n).argsort(1) < 24  # A owns 24 positions, B 40
    target = torch.randn(2 * k, n, p)
    hidden = torch.cat([~mask, mask]).unsqueeze(-1)
    pred = torch.where(hidden, target, target + 3.0)  # perfect exactly where each source was hidden
    assert dual_reconstruction_loss(pred, target, mask, "hidden") == 0
    assert dual_reconstruction_loss(pred, target, mask, "all") > 0
    # B scored with the wrong mask (A's positions instead of the complement) is not zero
    wrong = torch.where(torch.cat([~mask, ~mask]).unsqueeze(-1), target, target + 3.0)
    assert dual_reconstruction_loss(wrong, target, mask, "hidden") > 0
    # each source weighs 1/2 regardless of its number of hidden positions
    pred_b_bad = torch.cat([target[:k], target[k:] + 1.0])
    torch.testing.assert_close(dual_reconstruction_loss(pred_b_bad, target, mask), torch.tensor(0.5))


def test_rec_term_uses_model_predictions_and_batch_patches():
    model, teacher = _setup()
    x, dom = _toy_batch(2)
    mask = torch.rand(2, 64).argsort(1) < 32
    cfg = {"use_domain_content": False, "use_domain_style": False, "use_mftd": False, "use_siqc": False}
    losses = meduet_step_losses(model, None, x, dom, 0, cfg, mix_mask=mask)
    with torch.no_grad():
        out = model(x, mask, streams=2, domain_content=False, domain_style=False)
    expected = dual_reconstruction_loss(out["pred"], patchify(x, 2), mask)
    torch.testing.assert_close(losses["rec"].detach(), expected)
    assert set(losses) == {"rec", "loss"}


# ------------------------------------------------------------------------------------------------ domain / GRL
def test_grad_reverse_function():
    x = torch.randn(5, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((5,), -0.5))


def test_gradient_reversal_flips_encoder_gradient_of_content_domain_loss():
    model, _ = _setup()
    x, dom = _toy_batch(3)
    mask = torch.rand(3, 64).argsort(1) < 32

    def grads(coeff: float):
        model.zero_grad()
        out = model(x, mask, streams=0, domain_style=False, grl_lambda=coeff)
        F.cross_entropy(out["domain_content_logits"], dom).backward()
        return model.encoder.patch_embed.weight.grad.clone(), model.domain_content_head.weight.grad.clone()

    enc_rev, head_rev = grads(1.0)
    enc_plain, head_plain = grads(-1.0)  # coefficient -1 = no reversal
    assert enc_rev.abs().sum() > 0
    torch.testing.assert_close(enc_rev, -enc_plain)
    torch.testing.assert_close(head_rev, head_plain)  # the classifier itself is trained normally
    enc_half, _ = grads(0.5)
    torch.testing.assert_close(enc_half, 0.5 * enc_rev)


def test_confusion_adversary_trains_head_on_detached_content_and_encoder_towards_uniform():
    model, _ = _setup()
    x, dom = _toy_batch(3)
    mask = torch.rand(3, 64).argsort(1) < 32
    out = model(x, mask, streams=0, domain_style=False, extras=MeduetExtras(content_adversary="confusion"))
    # the classifier's cross-entropy reaches the head only
    model.zero_grad()
    F.cross_entropy(out["domain_content_logits"], dom).backward(retain_graph=True)
    assert model.domain_content_head.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.weight.grad is None or model.encoder.patch_embed.weight.grad.abs().sum() == 0
    # the confusion term reaches the encoder only
    model.zero_grad()
    conf = -F.log_softmax(out["domain_content_confusion_logits"], dim=1).mean()
    conf.backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.domain_content_head.weight.grad is None or model.domain_content_head.weight.grad.abs().sum() == 0
    # same logits, so the confusion term is the cross-entropy to the uniform distribution of the head's prediction
    torch.testing.assert_close(out["domain_content_logits"], out["domain_content_confusion_logits"].detach())
    # in the step losses: the encoder-side term is logged and minimised at a uniform prediction (log of #domains)
    losses = meduet_step_losses(model, None, x, dom, 0, {"use_mftd": False, "use_siqc": False,
                                                         "content_adversary": "confusion"})
    assert losses["domain_content_confusion"] >= math.log(model.num_domains) - 1e-5
    with pytest.raises(MeduetConfigError, match="content_adversary"):
        MeDUETLossConfig(content_adversary="wasserstein")


def test_domain_terms_and_accuracy_logged():
    model, teacher = _setup()
    x, dom = _toy_batch(3)
    losses = meduet_step_losses(model, teacher, x, dom, 0, {"use_mftd": False, "use_siqc": False})
    for name in ("domain_content", "domain_style"):
        assert losses[name] > 0 and 0 <= losses[f"acc_{name}"] <= 1
        assert not losses[f"acc_{name}"].requires_grad


# ------------------------------------------------------------------------------------------------ MFTD / teacher
def test_mftd_off_before_start_step_then_active():
    model, teacher = _setup()
    x, dom = _toy_batch(2)
    cfg = {"mftd_start_step": 5, "use_siqc": False}
    t_calls: list = []
    s_calls: list = []
    h1 = _calls(teacher.module.encoder.norm, t_calls)
    h2 = _calls(model.encoder.norm, s_calls)
    mask = torch.rand(2, 64).argsort(1) < 32
    before = meduet_step_losses(model, teacher, x, dom, 4, cfg, mix_mask=mask)
    assert before["mftd"].item() == 0.0 and not before["mftd"].requires_grad
    assert t_calls == [] and s_calls == [2]  # no teacher pass, no re-encoding: only the mixed pass (K = 2)
    after = meduet_step_losses(model, teacher, x, dom, 5, cfg, mix_mask=mask)
    h1.remove(), h2.remove()
    assert after["mftd"].item() > 0 and after["mftd"].requires_grad
    assert t_calls == [4] and s_calls == [2, 2, 4]  # teacher: unmixed A and B once; student re-encodes x_hat_A, x_hat_B
    torch.testing.assert_close(after["loss"] - before["loss"], 0.5 * after["mftd"], rtol=1e-4, atol=1e-4)


def test_mftd_only_hidden_positions_count():
    k, n = 2, 64
    mix = (torch.arange(n) < 20).repeat(k, 1)  # A owns the first 20 positions
    hidden = torch.cat([~mix, mix])
    t_c, t_s = torch.randn(2 * k, n, 8), torch.randn(2 * k, n, 4)
    s_c = torch.where(hidden.unsqueeze(-1), t_c, torch.randn_like(t_c))
    s_s = torch.where(hidden.unsqueeze(-1), t_s, torch.randn_like(t_s))
    for dist in ("cosine", "smooth_l1", "mse"):
        assert mftd_loss(s_c, s_s, t_c, t_s, hidden, dist).abs() < 1e-5
        assert mftd_loss(s_c, s_s, t_c, t_s, ~hidden, dist) > 0.1


def test_teacher_gets_no_gradient_and_student_does():
    model, teacher = _setup(learn_temperature=True)
    x, dom = _toy_batch(2)
    losses = meduet_step_losses(model, teacher, x, dom, 0, ALL_ON)
    losses["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_ema_cosine_schedule_and_update():
    assert cosine_momentum(0, 100) == pytest.approx(0.997)
    assert cosine_momentum(100, 100) == pytest.approx(0.9997)
    assert cosine_momentum(50, 100) == pytest.approx((0.997 + 0.9997) / 2)
    assert cosine_momentum(500, 100) == pytest.approx(0.9997)
    assert cosine_momentum(25, 100) < cosine_momentum(75, 100)
    model, teacher = _setup()
    assert isinstance(teacher.module, type(model.backbone))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    t_before = [p.clone() for p in teacher.parameters()]
    s_now = [p.detach().clone() for p in model.backbone.parameters()]
    m = teacher.update(model, 0, 100)
    assert m == pytest.approx(0.997) and teacher.momentum == m
    for tb, ta, s in zip(t_before, teacher.parameters(), s_now):
        torch.testing.assert_close(ta - s, m * (tb - s))  # moved (1 - m) of the way toward the student
    assert teacher.update(model, 100, 100) == pytest.approx(0.9997)
    # checkpoint round trip (weights_only load)
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    buf.seek(0)
    other = EMATeacher(build_meduet("tiny", num_domains=3))
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.momentum == pytest.approx(0.9997)
    for a, b in zip(other.parameters(), teacher.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ SiQC
def test_siqc_labels():
    cq, ck, sq, sk = siqc_labels(torch.tensor([0, 1, 2, 0]))
    assert cq.tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and ck.tolist() == [0, 1, 2, 3]
    # views: x_hat_A (dom A), x_hat_B (dom B), A<-sB (dom B), B<-sA (dom A)
    assert sq.tolist() == [0, 1, 2, 0, 2, 0, 0, 1] and sk.tolist() == [0, 1, 2, 0]
    # the first pair only (aux_pair_fraction < 1): queries of samples 0 and 2, keys still all four samples
    cq, ck, sq, sk = siqc_labels(torch.tensor([0, 1, 2, 0]), pairs=1)
    assert cq.tolist() == [0, 2, 0, 2] and ck.tolist() == [0, 1, 2, 3]
    assert sq.tolist() == [0, 2, 2, 0] and sk.tolist() == [0, 1, 2, 0]


def test_aux_pairs_give_the_same_views_and_terms_as_those_pairs_of_the_full_step():
    """MFTD/SiQC on a subset of the pairs: the swapped streams and re-encoded views are exactly the rows of the
    full step's for those pairs (every sequence is encoded and decoded on its own), and the terms are MFTD/SiQC
    of those rows against the teacher's tokens of those samples and keys of all samples."""
    torch.manual_seed(0)
    model = build_meduet("tiny", num_domains=3).eval()  # eval: no dropout, so both passes see the same weights
    teacher = EMATeacher(model)
    x = torch.randn(8, 4, 8, 8, 8)
    dom = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mask = torch.rand(4, 64).argsort(1) < 32
    with torch.no_grad():
        full = model(x, mask, streams=4, reencode=4)
        sub = model(x, mask, streams=4, reencode=4, extras=MeduetExtras(aux_pairs=2))
    k, p = 4, 2
    assert sub["pred"].shape[0] == 2 * k + 2 * p and sub["view_content"].shape[0] == 4 * p
    torch.testing.assert_close(sub["pred"][: 2 * k], full["pred"][: 2 * k])
    for blk in range(2):  # the swapped streams A<-sB, B<-sA of pairs 0, 1
        torch.testing.assert_close(sub["pred"][2 * k + blk * p: 2 * k + (blk + 1) * p],
                                   full["pred"][2 * k + blk * k: 2 * k + blk * k + p], atol=1e-5, rtol=1e-5)
    for blk in range(4):  # views x_hat_A, x_hat_B, A<-sB, B<-sA of pairs 0, 1
        torch.testing.assert_close(sub["view_content"][blk * p: (blk + 1) * p],
                                   full["view_content"][blk * k: blk * k + p], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="aux_pairs"):
        model(x, mask, streams=4, reencode=4, extras=MeduetExtras(aux_pairs=5))
    # the step's terms with aux_pair_fraction 0.5 are MFTD and SiQC of those rows
    cfg = {"mftd_start_step": 0, "aux_pair_fraction": 0.5}
    with torch.no_grad():
        losses = meduet_step_losses(model, teacher, x, dom, 0, cfg, mix_mask=mask)
        t = teacher.encode(x)
    rows = torch.tensor([0, 1, 4, 5])
    expect_mftd = mftd_loss(sub["view_content_tokens"][:4], sub["view_style_tokens"][:4], t["content_tokens"][rows],
                            t["style_tokens"][rows], ~sub["visible"][rows])
    torch.testing.assert_close(losses["mftd"], expect_mftd, atol=1e-5, rtol=1e-5)
    expect_siqc = siqc_loss(sub["view_content"], sub["view_style"], t["content"], t["style"], dom,
                            sub["temperature"], pairs=2)["siqc"]
    torch.testing.assert_close(losses["siqc"], expect_siqc, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="aux_pair_fraction"):
        meduet_step_losses(model, teacher, x, dom, 0, {"aux_pair_fraction": 0.0}, mix_mask=mask)


def test_supcon_lower_when_queries_match_positive_keys():
    torch.manual_seed(0)
    keys = torch.randn(8, 16)
    cq, ck, sq, sk = siqc_labels(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    matched = keys[cq]
    random = torch.randn(16, 16)
    good = supcon_loss(matched, keys, cq, ck, 0.07)
    bad = supcon_loss(random, keys, cq, ck, 0.07)
    assert good < 0.05 < bad
    # style: queries at their domain's mean key beat random queries
    dom_keys = torch.stack([keys[sk == d].mean(0) for d in range(3)])
    assert supcon_loss(dom_keys[sq], keys, sq, sk, 0.07) < supcon_loss(random, keys, sq, sk, 0.07)
    full = siqc_loss(matched, dom_keys[sq], keys, keys, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    torch.testing.assert_close(full["siqc"], full["siqc_content"] + full["siqc_style"])


def test_learnable_temperature_is_optimised():
    model, teacher = _setup(learn_temperature=True)
    assert "log_tau" in dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, dom = _toy_batch(2)
    before = model.log_tau.detach().clone()
    losses = meduet_step_losses(model, teacher, x, dom, 0, ALL_ON)
    losses["loss"].backward()
    assert model.log_tau.grad is not None and torch.all(model.log_tau.grad != 0)
    opt.step()
    assert torch.all(model.log_tau.detach() != before)
    torch.testing.assert_close(losses["tau_content"], torch.tensor(0.07))


def test_fixed_temperature_is_not_a_parameter():
    model, teacher = _setup()
    assert "log_tau" not in dict(model.named_parameters()) and "log_tau" in dict(model.named_buffers())
    torch.testing.assert_close(model.temperature(), torch.tensor([0.07, 0.07]))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_full_step_any_mixing_ratio(ratio):
    model, teacher = _setup()
    x, dom = _toy_batch(2)
    calls: list = []
    h = _calls(model.decoder, calls)
    losses = meduet_step_losses(model, teacher, x, dom, 0, dict(ALL_ON, mix_ratio=ratio))
    h.remove()
    assert calls == [8]  # A, B, A<-sB, B<-sA streams in one decoder call
    for key in ("rec", "domain_content", "domain_style", "mftd", "siqc", "loss"):
        assert torch.isfinite(losses[key]) and losses[key] > 0, key
    losses["loss"].backward()
    assert torch.isfinite(model.encoder.patch_embed.weight.grad).all()


def test_non_cubic_full_step():
    model, teacher = _setup()
    x = torch.randn(4, 4, 8, 12, 8)
    losses = meduet_step_losses(model, teacher, x, torch.tensor([0, 1, 2, 0]), 0, ALL_ON)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])


# ------------------------------------------------------------------------------------------------ training
def test_full_objective_decreases_on_toy_multisite_data():
    model, teacher = _setup()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01)
    x, dom = _toy_batch(6)
    gen = torch.Generator().manual_seed(1)
    totals = []
    steps = 30
    for step in range(steps):
        losses = meduet_step_losses(model, teacher, x, dom, step, ALL_ON, generator=gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        teacher.update(model, step, steps)
        totals.append(losses["loss"].item())
    assert all(math.isfinite(t) for t in totals)
    assert sum(totals[-3:]) / 3 < 0.9 * sum(totals[:3]) / 3, totals


def test_mae_baseline_loss_decreases():
    torch.manual_seed(0)
    mae = build_mae("tiny")
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    x, _ = _toy_batch(4)
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(15):
        losses = mae_step_losses(mae, x, generator=gen)
        assert set(losses) == {"loss", "rec"}
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        values.append(losses["loss"].item())
    assert sum(values[-3:]) < 0.8 * sum(values[:3]), values
    enc = mae.encode(x)
    assert enc["content"].shape == (8, 32) and enc["style"] is None


# ------------------------------------------------------------------------------------------------ ablations
@pytest.mark.parametrize("off", ["use_rec", "use_domain_content", "use_domain_style", "use_mftd", "use_siqc"])
def test_ablation_switch_removes_term_and_its_compute(off):
    model, teacher = _setup()
    x, dom = _toy_batch(2)
    calls = {name: [] for name in ("dec", "dom_c", "dom_s", "teacher", "student")}
    hooks = [
        _calls(model.decoder, calls["dec"]),
        _calls(model.domain_content_head, calls["dom_c"]),
        _calls(model.domain_style_head, calls["dom_s"]),
        _calls(teacher.module.encoder.norm, calls["teacher"]),
        _calls(model.encoder.norm, calls["student"]),
    ]
    losses = meduet_step_losses(model, teacher, x, dom, 0, {**ALL_ON, off: False})
    for h in hooks:
        h.remove()
    term = {"use_rec": "rec", "use_domain_content": "domain_content", "use_domain_style": "domain_style",
            "use_mftd": "mftd", "use_siqc": "siqc"}[off]
    assert term not in losses
    losses["loss"].backward()
    expected = {"dec": [8], "dom_c": [4], "dom_s": [4], "teacher": [4], "student": [2, 8]}
    if off == "use_domain_content":
        expected["dom_c"] = []
    if off == "use_domain_style":
        expected["dom_s"] = []
    if off == "use_siqc":  # dual streams only; only x_hat_A, x_hat_B re-encoded
        expected.update(dec=[4], student=[2, 4])
    assert calls == expected


def test_all_auxiliary_terms_off_needs_no_teacher_and_no_decoder():
    model, _ = _setup()
    x, dom = _toy_batch(2)
    dec: list = []
    h = _calls(model.decoder, dec)
    cfg = {"use_rec": False, "use_mftd": False, "use_siqc": False}
    losses = meduet_step_losses(model, None, x, dom, 10**6, cfg)
    h.remove()
    assert dec == [] and set(losses) == {"domain_content", "acc_domain_content", "domain_style",
                                         "acc_domain_style", "loss"}
    with pytest.raises(MeduetConfigError):
        meduet_step_losses(model, None, x, dom, 0, ALL_ON)  # SiQC needs the teacher


def test_config_validation():
    assert MeDUETLossConfig.from_mapping(None) == MeDUETLossConfig()
    cfg = MeDUETLossConfig.from_mapping({"w_siqc": 0.1})
    assert (cfg.w_rec, cfg.w_domain_content, cfg.w_domain_style, cfg.w_mftd, cfg.w_siqc) == (1.0, 0.2, 0.2, 0.5, 0.1)
    with pytest.raises(MeduetConfigError, match="unknown"):
        MeDUETLossConfig.from_mapping({"w_sicq": 0.1})
    with pytest.raises(MeduetConfigError):
        MeDUETLossConfig(mix_ratio=1.0)


def test_token_confusion_adversary_scores_every_own_token():
    model, _ = _setup()
    x, dom = _toy_batch(3)
    mask = torch.rand(3, 64).argsort(1) < 32
    out = model(x, mask, streams=0, domain_style=False, extras=MeduetExtras(content_adversary="confusion_tokens"))
    logits, visible = out["domain_content_logits"], out["visible"]
    assert logits.shape == (6, 64, model.num_domains) and visible.shape == (6, 64)
    # row k (source A) holds A's content at A's positions: the per-token logits there are the pooled head's input
    # token by token (the head is position-wise)
    own = out["content_tokens"][0][mask[0]]
    torch.testing.assert_close(logits[0][visible[0]], model.domain_content_head(own).detach())
    # the loss is the cross-entropy over own tokens only, each labelled with its source's site
    ce = domain_losses(dom, logits, token_mask=visible)["domain_content"]
    expect = F.cross_entropy(logits[visible], dom[:, None].expand(6, 64)[visible])
    torch.testing.assert_close(ce, expect)
    # the classifier learns on detached tokens; the confusion term reaches the encoder only
    model.zero_grad()
    ce.backward()
    assert model.domain_content_head.weight.grad.abs().sum() > 0
    assert model.encoder.patch_embed.weight.grad is None or model.encoder.patch_embed.weight.grad.abs().sum() == 0
    model.zero_grad()
    (-F.log_softmax(out["domain_content_confusion_logits"][visible], dim=1).mean()).backward()
    assert model.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert model.domain_content_head.weight.grad is None or model.domain_content_head.weight.grad.abs().sum() == 0
    losses = meduet_step_losses(model, None, x, dom, 0, {"use_mftd": False, "use_siqc": False,
                                                         "content_adversary": "confusion_tokens"})
    assert losses["domain_content_confusion"] >= math.log(model.num_domains) - 1e-5
    assert 0.0 <= float(losses["acc_domain_content"]) <= 1.0
