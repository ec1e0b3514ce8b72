"""meduet_pretrain beyond training: the checkpoint record, extract.yaml, evaluate.yaml, inference.json and
monai.bundle.load, on a tiny VAE's real latent cache of the tiny phantoms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, bundle_run
from meduet import records
from meduet.latent import LatentSpace, LatentDatalist, load_latent
from meduet.metrics.transfer import SWAP_TARGET, eta_squared, oracle_paint, swap_gaps, swap_pairs
from meduet.networks.windows import encode_latents
from meduet.errors import MeduetConfigError
from meduet.metrics.disentanglement import (bootstrap_interval, bootstrap_mean_interval, chance_level,
                                           fit_linear_eraser, probe_accuracy, probe_predictions, similarity_ratio)
from meduet.networks.encoder import PRETRAIN_KINDS, PretrainedEncoder, build_encoder
from meduet.networks.meduet import build_meduet


def load_pretrain(path):
    return records.load(path, expect=PRETRAIN_KINDS)


def load_encoder(path):
    return records.load_part(path, PretrainedEncoder)


@pytest.fixture(scope="module")
def pretrained(tiny_pretrain) -> Path:
    """A bundle root with a tiny MeDUET (models/model.pt) and a tiny MAE baseline (conftest's ``tiny_pretrain``)."""
    return tiny_pretrain


def test_model_pt_carries_what_downstream_needs(pretrained, tiny_latents):
    latents = json.loads(tiny_latents.read_text())
    # model.pt is the deployable encoder, exactly (strict load); training_network.pt the whole network
    enc = load_pretrain(pretrained / "models/model.pt")
    assert type(enc).__name__ == "PretrainedEncoder" and enc.kind == "meduet_encoder"
    assert set(torch.load(pretrained / "models/model.pt", weights_only=True)) == set(enc.state_dict())
    model = load_pretrain(pretrained / "models/training_network.pt")
    assert model.kind == "meduet" and model.arch["dim"] == 32  # tiny preset
    for m in (enc, model):
        assert m.meta["latent_scale_factor"] == pytest.approx(latents["latent_scale_factor"])
        assert m.meta["domains"] == latents["domains"]
        assert m.meta["vae_config_hash"] == latents["vae_config_hash"]
        assert m.meta["crop_size"] == [8, 8, 8] and m.meta["objective"] == "meduet"
    baseline = load_pretrain(pretrained / "models/baseline_mae/model.pt")
    assert baseline.kind == "mae_encoder" and (pretrained / "models/baseline_mae/checkpoint.pt").is_file()
    assert load_pretrain(pretrained / "models/baseline_mae/training_network.pt").kind == "mae"
    # the deployable encoder computes exactly what the full network's encoder computes
    x = torch.randn(2, 4, 8, 12, 8)
    with torch.no_grad():
        ref, got = model.encode(x), enc.encode(x)
        fmap = enc(x)
    for key in ("content", "style", "content_tokens", "style_tokens"):
        torch.testing.assert_close(got[key], ref[key])
    assert fmap.shape == (2, 32 + 8, 4, 6, 4)
    torch.testing.assert_close(fmap[:, :32].flatten(2).mean(-1), ref["content"])


def test_checkpoint_mismatches_are_one_line_errors(pretrained, tmp_path):
    state = torch.load(pretrained / "models/training_network.pt", weights_only=True)
    with pytest.raises(MeduetConfigError, match="another 'meduet' architecture"):
        build_meduet("demo", num_domains=len(load_pretrain(pretrained / "models/model.pt").meta["domains"])
                     ).load_state_dict(state)
    with pytest.raises(MeduetConfigError, match="'meduet' network .*but this is a 'mae_encoder' network"):
        build_encoder("tiny", objective="mae").load_state_dict(state, strict=False)
    enc_state = torch.load(pretrained / "models/model.pt", weights_only=True)
    with pytest.raises(MeduetConfigError, match="another 'meduet_encoder' architecture"):
        build_encoder("demo").load_state_dict(enc_state)
    torch.save({k: v for k, v in state.items() if k != "_extra_state"}, tmp_path / "bare.pt")
    with pytest.raises(MeduetConfigError, match="has no checkpoint record"):
        load_pretrain(tmp_path / "bare.pt")
    with pytest.raises(MeduetConfigError, match="does not exist; train meduet_pretrain first"):
        load_encoder(tmp_path / "missing.pt")


def test_a_batch_larger_than_the_training_data_is_one_line_and_writes_no_model(tiny_latents, tmp_path):
    """The paper's batch of 256 on a small cache: one line naming the fix, not "dataloader is empty" and exit 0."""
    proc = bundle_run("meduet_pretrain", "train", "--bundle_root", str(tmp_path), "--latent_datalist",
                      str(tiny_latents), "--batch_size", "256", run_id="training", check=False)
    assert proc.returncode != 0
    last = (proc.stdout + proc.stderr).strip().splitlines()[-1]
    assert "make no batch of batch_size 256" in last and "set batch_size to at most" in last
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "models" / "model.pt").exists()


def test_extract_writes_embeddings_of_every_item(pretrained, tiny_latents):
    out = pretrained / "embeddings"
    bundle_run("meduet_pretrain", "extract", "--bundle_root", str(pretrained), "--latent_datalist", str(tiny_latents),
               "--output_dir", str(out))
    index = json.loads((out / "embeddings.json").read_text())
    latents = json.loads(tiny_latents.read_text())
    assert index["objective"] == "meduet" and index["content_dim"] == 32 and index["style_dim"] == 8
    assert index["style_pool"] == "mean_std" and index["style_vector_dim"] == 16  # tiny: [mean, std] of 8 channels
    assert index["domains"] == latents["domains"]
    enc = load_encoder(pretrained / "models/model.pt")
    for split in ("training", "validation", "test"):
        assert len(index[split]) == len(latents[split])
        for item in index[split]:
            emb = torch.load(out / item["embedding"], weights_only=True)
            assert emb["content"].shape == (32,) and emb["style"].shape == (16,)
            assert emb["content_map"].shape[0] == 32 and emb["style_map"].shape[0] == 8
            assert item["domain"] in latents["domains"] and item["domain_index"] == latents["domains"].index(item["domain"])
    # recompute one: the stored vector is the encoder's pooled content of the scaled, padded whole latent
    item = index["test"][0]
    again = encode_latents(enc, [load_latent(item["latent"])], LatentSpace.from_record(latents))[0]
    stored = torch.load(out / item["embedding"], weights_only=True)
    torch.testing.assert_close(stored["content"], again["content"])
    # the style vector: mean and (population) std of the style map's channels over its tokens
    sm = stored["style_map"].flatten(1)
    torch.testing.assert_close(stored["style"], torch.cat([sm.mean(1), (sm.var(1, unbiased=False) + 1e-6).sqrt()]))


def test_extract_refuses_latents_of_another_vae(pretrained, tiny_latents, tmp_path):
    other = json.loads(tiny_latents.read_text())
    other["vae_config_hash"] = "0123456789abcdef"
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(other))
    (tmp_path / "latents").symlink_to(tiny_latents.parent / "latents")
    proc = bundle_run("meduet_pretrain", "extract", "--bundle_root", str(pretrained), "--latent_datalist", str(path),
                      "--output_dir", str(tmp_path / "emb"), check=False)
    assert proc.returncode != 0
    assert "come from different VAEs" in proc.stderr and "encode the data with the VAE" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "emb" / "embeddings.json").exists()


def test_evaluate_reports_probes_plots_and_style_swap(pretrained, tiny_latents, tiny_vae):
    out = pretrained / "eval"
    bundle_run("meduet_pretrain", "evaluate", "--bundle_root", str(pretrained), "--latent_datalist",
               str(tiny_latents), "--vae_ckpt", str(tiny_vae / "models/model.pt"), "--output_dir", str(out),
               "--embedding_plot", "pca", "--erased_rows", "True")
    m = json.loads((out / "metrics.json").read_text())
    assert m["cases"] == 8 and m["subjects"] == 2  # 2 test subjects x 4 sites
    f = m["factors"]
    assert set(f) == {"MeDUET content", "MeDUET style", "MAE baseline", "MeDUET content, stored eraser",
                      "MeDUET content + LEACE", "MAE baseline + LEACE", "chance"}
    # --erased_rows: both encoders erased the same way, fitted on the pretraining splits (never the test split)
    er_rows = m["erased_rows"]
    assert er_rows["rows"] == ["MeDUET content + LEACE", "MAE baseline + LEACE"]
    assert er_rows["splits"] == ["training", "validation"] and "test" not in er_rows["splits"]
    assert f["chance"]["site"] == pytest.approx(0.25)
    # the headline content row is raw: the content head as pretraining left it, not through the stored eraser
    # (tiny_pretrain switched that option on); the eraser's own row differs
    from meduet.workflows.pretrain.evaluate import _pooled

    enc = load_encoder(pretrained / "models/model.pt")
    cache = LatentDatalist(tiny_latents)
    z = [load_latent(it["latent"]) for it in cache.items("test")]
    raw, stored = _pooled(enc, z, cache.space, "cpu", "raw"), _pooled(enc, z, cache.space, "cpu", "stored", raw=False)
    assert bool(enc.backbone.factors.eraser.fitted)  # raw=True left the stored eraser in place
    assert not np.allclose(raw[0]["content"].numpy(), stored[0]["content"].numpy())
    # raw = the content head before the eraser, on the same windows
    x = cache.space.scale(z[0][None])[..., :4, :4, :4]
    with torch.no_grad():
        head, erased = enc.encode(x, erase=False)["content"], enc.encode(x)["content"]
    torch.testing.assert_close(enc.backbone.factors.eraser(head), erased)
    assert f["MeDUET content"] != f["MeDUET content, stored eraser"]
    # train.yaml fitted the content eraser on the pretraining cases (training + validation: 3 seen sites), never on
    # the test split; the tiny latents have no augmented copies, so only its site part
    er = m["stored_content_eraser"]
    train_sites = {it["domain"] for s in ("training", "validation") for it in json.loads(tiny_latents.read_text())[s]}
    assert er["sites"] == sorted(train_sites) and er["splits"] == ["training", "validation"]
    assert 1 <= er["site_rank"] <= len(train_sites) - 1 and er["appearance_dims"] == er["appearance_copies"] == 0
    # how it was pretrained comes from the checkpoint's record: the tiny preset's loss, no copies
    assert m["pretraining"]["loss"]["mftd_start_step"] == 2 and "augmentation" not in m["pretraining"]
    for name in ("MeDUET content", "MeDUET style", "MAE baseline", "MeDUET content, stored eraser"):
        acc, (low, high) = f[name]["site_probe_balanced_accuracy"], f[name]["site_probe_ci95"]
        assert 0.0 <= low <= acc <= high <= 1.0
        acc, (low, high) = f[name]["anatomy_probe_balanced_accuracy"], f[name]["anatomy_probe_ci95"]
        assert 0.0 <= low <= acc <= high <= 1.0
        assert f[name]["site_similarity"]["ratio"] > 0
    assert set(m["targets_met"]) == {"style_site_probe>=0.9", "content_site_probe<=chance+0.15",
                                     "baseline_site_probe>content_site_probe", "style_swap_gap_closed>=0.25"}
    sw = m["style_swap"]
    assert m["targets_met"]["style_swap_gap_closed>=0.25"] == (sw["mean"]["gap_closed"] >= SWAP_TARGET)
    # by default one pair per site: every site (4 in the tiny data) once as content and once as style
    assert sorted(r["content_site"] for r in sw["pairs"]) == sorted(r["style_site"] for r in sw["pairs"]) == sorted(
        {it["domain"] for it in json.loads(tiny_latents.read_text())["test"]})
    for row in sw["pairs"]:
        assert row["content_site"] != row["style_site"] and row["content_case"] != row["style_case"]
        assert row["target_case"].split("_")[0] == row["content_case"].split("_")[0]  # A's subject at B's site
        assert all(np.isfinite(row[k]) for k in ("gap_closed", "anatomy_kept", "intensity_gap_swap", "gap_closed_vs_scan",
                                                 "vae_ceiling", "oracle_gap_closed"))
        assert row["intensity_gap_rec"] >= 0 and row["intensity_gap_rec_vs_scan"] >= 0
    low, high = sw["gap_closed_ci95"]
    assert low <= sw["mean"]["gap_closed"] <= high
    assert min(r["gap_closed"] for r in sw["pairs"]) <= low and high <= max(r["gap_closed"] for r in sw["pairs"])
    for png in ("embeddings_2d.png", "style_swap.png"):
        assert (out / png).stat().st_size > 5000


def _blocks(rng: np.random.Generator, grid=(4, 3, 5), factor: int = 2, classes: int = 4) -> np.ndarray:
    """A label map constant on every ``factor``^3 block (each class present)."""
    lab = rng.integers(0, classes, size=grid)
    lab.flat[:classes] = np.arange(classes)
    return lab.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)


def test_swap_pairs_cover_every_site_and_never_repeat():
    items = [{"subject": f"s{i}", "domain": f"site{k}"} for i in range(3) for k in range(6)]
    one_round = swap_pairs(items)
    assert [(a["domain"], b["domain"]) for a, b, _ in one_round] == [(f"site{k}", f"site{(k + 3) % 6}") for k in range(6)]
    for a, b, t in one_round:
        assert a["subject"] != b["subject"] and (t["subject"], t["domain"]) == (a["subject"], b["domain"])
    # past one round the subjects move on: 3 subjects x 6 sites give 18 distinct triples, then it stops
    every = swap_pairs(items, 100)
    keys = [(a["subject"], a["domain"], b["subject"], b["domain"]) for a, b, _ in every]
    assert len(every) == 18 and len(set(keys)) == 18 and every[:6] == one_round
    assert len({(a["subject"], a["domain"]) for a, _, _ in every}) == 18  # every case once as content
    # a missing target scan drops only the pairs that need it; one subject or one site gives nothing to swap
    partial = [it for it in items if (it["subject"], it["domain"]) != ("s0", "site3")]
    assert all((t["subject"], t["domain"]) != ("s0", "site3") for _, _, t in swap_pairs(partial, 100))
    assert len(swap_pairs(partial, 100)) < 18
    assert swap_pairs([it for it in items if it["subject"] == "s0"]) == []
    assert swap_pairs([it for it in items if it["domain"] == "site0"]) == []


def test_swap_gaps_measure_how_far_the_swap_moves_region_means():
    rng = np.random.default_rng(0)
    lab_a, lab_t = _blocks(rng), _blocks(rng)  # the same regions, other places (A and T need no alignment)
    table_a, table_scan = np.array([0.0, 0.3, 0.5, 0.9]), np.array([0.0, 0.5, 0.2, 0.6])
    table_vae = table_scan + np.array([0.0, 0.05, 0.1, -0.2])  # the VAE's rendering of T is off per region
    scan = table_scan[lab_t] + rng.normal(0, 0.01, lab_t.shape)
    rendered = table_vae[lab_t]
    rec = table_a[lab_a]
    to_rendered = table_vae[lab_a]
    g = swap_gaps(rec, to_rendered, lab_a, rendered, scan, lab_t)
    assert g["gap_closed"] == pytest.approx(1.0) and g["intensity_gap_swap"] == pytest.approx(0.0)
    assert g["intensity_gap_rec"] == pytest.approx(np.abs(table_a - table_vae)[1:].mean())
    assert g["gap_closed_vs_scan"] < 1.0  # against the real scan the same swap falls short
    # the swap reaches exactly what T's own latent reaches against the scan
    assert g["gap_closed_vs_scan"] == pytest.approx(g["vae_ceiling"])
    assert swap_gaps(rec, rec, lab_a, rendered, scan, lab_t)["gap_closed"] == pytest.approx(0.0)
    # halfway (every region moves toward the target from the same side): half the gap
    half = swap_gaps(rec, 0.5 * (rec + to_rendered), lab_a, rendered, scan, lab_t)
    assert half["gap_closed"] == pytest.approx(0.5)
    # a perfect VAE: its rendering is the scan, the ceiling is 1
    assert swap_gaps(rec, rec, lab_a, scan, scan, lab_t)["vae_ceiling"] == pytest.approx(1.0)
    with pytest.raises(MeduetConfigError, match="share no region"):
        swap_gaps(rec, rec, np.zeros_like(lab_a), rendered, scan, np.zeros_like(lab_t))


def test_oracle_paint_takes_each_tissue_value_from_the_other_scan():
    rng = np.random.default_rng(1)
    lab_a, lab_t = _blocks(rng), _blocks(rng)
    values_a, values_t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))  # 4 tissues, 3 latent channels

    def latent(lab, values):  # one latent voxel per 2^3 label block
        return torch.from_numpy(values[lab[::2, ::2, ::2]]).permute(3, 0, 1, 2).float()

    z_a, z_t = latent(lab_a, values_a), latent(lab_t, values_t)
    torch.testing.assert_close(oracle_paint(lab_a, z_a, 2), z_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(oracle_paint(lab_a, z_a, 2, (lab_t, z_t)), latent(lab_a, values_t), atol=1e-5, rtol=0)
    assert oracle_paint(lab_a[:-1], z_a, 2) is None  # the label grid is not factor x the latent grid


def test_inference_json_and_monai_bundle_load(pretrained, tiny_latents, tmp_path):
    out = tmp_path / "infer"
    bundle_run("meduet_pretrain", "inference", "--bundle_root", str(pretrained), "--output_dir", str(out),
               "--dataset_dir", str(tiny_latents.parent), "--max_cases", "2")
    index = json.loads((out / "embeddings.json").read_text())["test"]
    assert len(index) == 2
    latents = {Path(it["latent"]).name: it for it in json.loads(tiny_latents.read_text())["test"]}
    enc = load_encoder(pretrained / "models/model.pt")
    scale = LatentSpace.from_record(json.loads(tiny_latents.read_text()))
    for it in index:
        got = torch.load(out / it["embedding"], weights_only=True)
        ref = encode_latents(enc, [load_latent(it["latent"])], scale)[0]
        torch.testing.assert_close(got["content"], ref["content"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["style"], ref["style"], atol=1e-5, rtol=1e-5)
        assert latents[Path(it["latent"]).name]["domain"] == it["domain"]  # the item's site travels along

    # monai.bundle.load: the bundle folder as a user downloads it, the preset chosen by net_override
    from monai.bundle import load

    bundle_dir = tmp_path / "bundles"
    shutil.copytree(REPO / "bundles/meduet_pretrain", bundle_dir / "meduet_pretrain",
                    ignore=shutil.ignore_patterns("models", "runs", "eval", "embeddings"))
    (bundle_dir / "meduet_pretrain/models").mkdir()
    shutil.copy(pretrained / "models/model.pt", bundle_dir / "meduet_pretrain/models/model.pt")
    net = load("meduet_pretrain", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
               net_override={"preset": "tiny"})
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), enc(x))
    assert net.meta["latent_scale_factor"] == pytest.approx(scale.scale_factor)
    with pytest.raises(MeduetConfigError, match="another 'meduet_encoder' architecture"):
        load("meduet_pretrain", bundle_dir=str(bundle_dir), workflow_type="inference", device="cpu",
             net_override={"preset": "demo"})


def test_probe_and_similarity_measure_what_they_claim():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(6), 6)
    sites = np.tile(np.arange(6), 6)
    site_code = rng.normal(size=(6, 16)) * 3.0
    separable = site_code[sites] + rng.normal(size=(36, 16))
    noise = rng.normal(size=(36, 16))
    assert probe_accuracy(separable, sites, groups=subjects) == pytest.approx(1.0)
    # on features without site information the probe is at chance on average (single draws of 36 cases scatter
    # by about +-0.08)
    noise_acc = [probe_accuracy(np.random.default_rng(s).normal(size=(36, 16)), sites, groups=subjects)
                 for s in range(8)]
    assert abs(np.mean(noise_acc) - chance_level(sites)) < 0.06
    assert similarity_ratio(separable, sites)["ratio"] < 0.8
    assert abs(similarity_ratio(noise, sites)["ratio"] - 1.0) < 0.1


def test_bootstrap_interval_resamples_whole_groups_and_narrows_with_more_of_them():
    rng = np.random.default_rng(3)
    site_code = rng.normal(size=(6, 16)) * 0.6  # a weak site signal: the probe is right about half the time

    def cases(n_subjects, seed):
        r = np.random.default_rng(seed)
        subjects, sites = np.repeat(np.arange(n_subjects), 6), np.tile(np.arange(6), n_subjects)
        return site_code[sites] + r.normal(size=(len(sites), 16)), sites, subjects

    x, sites, subjects = cases(6, 0)
    pred = probe_predictions(x, sites, groups=subjects)
    acc = probe_accuracy(x, sites, groups=subjects)
    low, high = bootstrap_interval(sites, pred, subjects)
    assert low < acc < high and 0.0 <= low and high <= 1.0
    assert bootstrap_interval(sites, pred, subjects) == (low, high)  # seeded
    # perfect predictions: every resample is perfect
    assert bootstrap_interval(sites, sites, subjects) == (1.0, 1.0)
    # four times the subjects: the interval of the same kind of probe is about half as wide
    x4, sites4, subjects4 = cases(24, 1)
    low4, high4 = bootstrap_interval(sites4, probe_predictions(x4, sites4, groups=subjects4), subjects4)
    assert high4 - low4 < 0.75 * (high - low)
    # resampling cases instead of whole subjects ignores that a subject's cases go together: here the subjects
    # differ (one is always right, one always wrong), so subject resampling gives the wider interval
    grouped_pred = np.where(subjects < 3, sites, (sites + 1) % 6)
    by_subject = bootstrap_interval(sites, grouped_pred, subjects)
    by_case = bootstrap_interval(sites, grouped_pred)
    assert by_subject[1] - by_subject[0] > 1.5 * (by_case[1] - by_case[0])
    with pytest.raises(ValueError, match="same non-zero length"):
        bootstrap_interval(sites, pred[:-1], subjects)


def test_bootstrap_mean_interval_covers_the_mean_and_ignores_nan():
    values = [0.09, 0.05, 0.15, 0.39, -0.01, -0.20]
    low, high = bootstrap_mean_interval(values)
    assert min(values) < low < np.mean(values) < high < max(values)
    assert bootstrap_mean_interval(values + [float("nan")]) == (low, high)
    assert bootstrap_mean_interval([0.3] * 6) == pytest.approx((0.3, 0.3))
    # twice as many pairs of the same spread: a narrower interval
    low2, high2 = bootstrap_mean_interval(values * 4)
    assert high2 - low2 < 0.7 * (high - low)
    with pytest.raises(ValueError, match="at least one finite"):
        bootstrap_mean_interval([float("nan")])


def test_linear_eraser_removes_what_a_linear_probe_reads_and_keeps_the_rest():
    rng = np.random.default_rng(1)
    n_sites, per = 4, 12
    site_code = rng.normal(size=(n_sites, 24)) * 3.0
    anatomy_code = rng.normal(size=(per, 24)) * 3.0

    def cases(seed):  # every subject at every site: site offset + anatomy offset + noise
        r = np.random.default_rng(seed)
        s = np.repeat(np.arange(n_sites), per)
        a = np.tile(np.arange(per), n_sites)
        return site_code[s] + anatomy_code[a] + r.normal(size=(len(s), 24)), s, a

    fit_x, fit_s, _ = cases(2)
    eraser = fit_linear_eraser(fit_x, fit_s)
    assert eraser.rank == n_sites - 1
    erased_fit = eraser(fit_x)
    means = np.stack([erased_fit[fit_s == c].mean(0) for c in range(n_sites)])
    np.testing.assert_allclose(means, means.mean(0, keepdims=True).repeat(n_sites, 0), atol=1e-8)  # equal means
    # fitted on some cases, applied to new ones: the site probe falls to about chance, the anatomy stays readable
    x, s, a = cases(3)
    assert probe_accuracy(x, s, groups=a) == pytest.approx(1.0)
    assert probe_accuracy(eraser(x), s, groups=a) < chance_level(s) + 0.15
    assert probe_accuracy(eraser(x), a, groups=s) > 0.9
    with pytest.raises(ValueError, match="two classes"):
        fit_linear_eraser(fit_x, np.zeros(len(fit_x)))


def test_model_pt_content_eraser_equalises_the_sites_of_its_fit_cases(pretrained, tiny_latents):
    model = load_pretrain(pretrained / "models/training_network.pt")
    er = model.meta["content_eraser"]
    assert bool(model.factors.eraser.fitted) and er["cases"] == sum(
        len(json.loads(tiny_latents.read_text())[s]) for s in er["splits"])
    latents = LatentDatalist(tiny_latents)
    items = [it for s in er["splits"] for it in latents.items(s)]
    z = [load_latent(it["latent"]) for it in items]
    sites = np.array([it["domain"] for it in items])
    erased = np.stack([e["content"].numpy() for e in encode_latents(model, z, latents.space)])
    fitted = {k: v.clone() for k, v in model.factors.eraser.state_dict().items()}
    model.factors.eraser.set(None, None)
    raw = np.stack([e["content"].numpy() for e in encode_latents(model, z, latents.space)])
    model.factors.eraser.load_state_dict(fitted)

    def spread_of_site_means(x):
        means = np.stack([x[sites == c].mean(0) for c in np.unique(sites)])
        return float(np.abs(means - means.mean(0)).max())

    # LEACE: on the cases it was fitted on, every site has the same mean pooled content (float32 encoder)
    assert spread_of_site_means(raw) > 1e-3
    assert spread_of_site_means(erased) < 1e-3 * spread_of_site_means(raw) + 1e-5
    # and the content changes only along the erased directions (rank <= sites - 1)
    assert np.linalg.matrix_rank(raw - erased, tol=1e-4 * np.abs(raw).max()) <= len(er["sites"]) - 1
    # the decoder-facing content (erase=False) is the head before the eraser
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        a, b = model.encode(x)["content"], model.encode(x, erase=False)["content"]
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model.factors.eraser(b), a)


def test_eta_squared_follows_the_label_structure():
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), np.int64)
    label[2:14, 2:14, 2:14] = 1
    label[5:9, 5:9, 5:9] = 2
    means = np.array([0.0, 0.3, 0.8])
    image = means[label] + rng.normal(scale=0.02, size=label.shape)
    assert eta_squared(image, label) > 0.95
    shuffled = np.roll(image, 5, axis=0)  # same intensities, anatomy moved away from the labels
    assert eta_squared(shuffled, label) < 0.5
