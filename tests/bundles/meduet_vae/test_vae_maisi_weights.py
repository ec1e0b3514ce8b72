"""MAISI's published CT autoencoder as meduet_vae's starting point.

* ``bundles/meduet_vae/large_files.yml`` lists the file exactly as the MONAI model zoo's ``maisi_ct_generative``
  bundle does, and MONAI 1.6's own ``download_large_files`` reads it;
* ``download_large_files`` fetches a file of that format (a locally made stand-in, served on 127.0.0.1: nothing
  leaves this machine), checks its hash, keeps a good existing copy and refuses wrong hashes;
* the paper preset is MAISI's autoencoder architecture and ``pretrained_ckpt`` loads that file into it.

The stand-in is a full-size ``AutoencoderKlMaisi`` of the zoo's ``autoencoder_def`` with random weights (same keys,
shapes and ``torch.save`` format as the real file; ~83 MB, written once per module).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.utils import HashCheckError
from monai.bundle import ConfigParser
from monai.bundle import scripts as bundle_scripts

from conftest import REPO

VAE_BUNDLE = REPO / "bundles" / "meduet_vae"
CONFIGS = VAE_BUNDLE / "configs"

# Read from Project-MONAI/model-zoo, branch dev at dfae206df112837d817e78d3727c9f32b3b52e82 (2024-10-11; bundle
# version 0.4.5; the same entry at c1ab4206111d121e0b6364cdafe784d148d34e4f, the 0.4.6 TensorRT branch):
# models/maisi_ct_generative/large_files.yml, its first entry (the CT autoencoder) ...
ZOO_AUTOENCODER = {
    "path": "models/autoencoder_epoch273.pt",
    "url": "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/"
           "model_maisi_autoencoder_epoch273_alternative.pt",
    "hash_val": "917cfb1e49631c8a713e3bb7c758fbca",
    "hash_type": "md5",
}
# ... and models/maisi_ct_generative/configs/inference.json's "autoencoder_def", with @spatial_dims = 3,
# @image_channels = 1, @latent_channels = 4 resolved; the zoo loads the file with
# autoencoder.load_state_dict(torch.load(path, weights_only=True)).
ZOO_AUTOENCODER_DEF = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "latent_channels": 4,
    "num_channels": [64, 128, 256],
    "num_res_blocks": [2, 2, 2],
    "norm_num_groups": 32,
    "norm_eps": 1e-06,
    "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False,
    "use_checkpointing": False,
    "use_convtranspose": False,
    "norm_float16": True,
    "num_splits": 8,
    "dim_split": 1,
}
# arguments that change memory/speed only, never the parameters (meduet_vae keeps them in `vae_runtime`)
RUNTIME_ONLY = ("use_checkpointing", "norm_float16", "num_splits", "dim_split")
WEIGHTS_DEF = {k: v for k, v in ZOO_AUTOENCODER_DEF.items() if k not in RUNTIME_ONLY}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _vae_config(*presets: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([CONFIGS / "train.yaml", *(CONFIGS / "presets" / f"{p}.yaml" for p in presets)])
    return parser


# ---------------------------------------------------------------------------------------------------- the listing
def test_large_files_yml_is_the_zoo_entry_as_monai_reads_it(monkeypatch):
    # parsed the way monai.bundle.scripts.download_large_files does: every large_files.{yml,yaml,json} of the
    # bundle through ConfigParser, then its "large_files" list
    found = [p for p in VAE_BUNDLE.glob("large_files*") if p.suffix in (".yml", ".yaml", ".json")]
    assert found == [VAE_BUNDLE / "large_files.yml"]
    assert ConfigParser.load_config_file(found[0])["large_files"] == [ZOO_AUTOENCODER]

    # and MONAI's function itself, with only its downloader swapped for a recorder (no network)
    requests: list[dict] = []
    monkeypatch.setattr(bundle_scripts, "download_url", lambda **kw: requests.append(kw))
    bundle_scripts.download_large_files(bundle_path=str(VAE_BUNDLE))
    assert requests == [{
        "url": ZOO_AUTOENCODER["url"],
        "hash_val": ZOO_AUTOENCODER["hash_val"],
        "hash_type": "md5",
        "filepath": str(VAE_BUNDLE / "models" / "autoencoder_epoch273.pt"),
    }]


def test_paper_preset_is_maisi_ct_autoencoder():
    paper = _vae_config("paper")
    assert paper.get("vae") == WEIGHTS_DEF  # every argument that shapes the parameters, as the zoo has it
    # the zoo splits 8-fold for 512^3 inference; the paper preset trains on 64^3 crops, which 8 splits cannot take
    assert {k: paper.get("vae_runtime")[k] for k in ("num_splits", "dim_split")} == {"num_splits": 4, "dim_split": 1}
    assert paper.get("pretrained_ckpt") is None  # no file is shipped; the preset requires one (test_vae_paper_weights.py)
    assert _vae_config().get("vae") == WEIGHTS_DEF  # the base config is the same size
    for small in ("tiny", "demo"):  # the CPU presets shrink the network: MAISI's file does not fit them
        assert _vae_config(small).get("vae")["num_channels"] != WEIGHTS_DEF["num_channels"]


# ------------------------------------------------------------------------------- a MAISI-format file, served here
@pytest.fixture(scope="module")
def maisi_file(tmp_path_factory) -> Path:
    """A plain ``AutoencoderKlMaisi`` state dict of the zoo's architecture (random weights), saved with torch.save."""
    torch.manual_seed(0)
    # norm_float16 only changes the norm's compute dtype and needs CUDA; the parameters are the same
    net = AutoencoderKlMaisi(**{**ZOO_AUTOENCODER_DEF, "norm_float16": False})
    path = tmp_path_factory.mktemp("www") / "model_maisi_autoencoder_standin.pt"
    torch.save(net.state_dict(), path)
    return path


class _CountingHandler(SimpleHTTPRequestHandler):
    gets: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).gets.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # no per-request lines on stderr
        pass


@pytest.fixture(scope="module")
def served(maisi_file):
    """``maisi_file`` over HTTP from 127.0.0.1 (port chosen by the OS, daemon thread, stopped after the module);
    yields ``(url, list of GET paths)``. Proxy variables are unset meanwhile so urllib talks to it directly."""
    handler = type("Handler", (_CountingHandler,), {"gets": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(maisi_file.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
                mp.delenv(var, raising=False)
            yield f"http://127.0.0.1:{server.server_address[1]}/{maisi_file.name}", handler.gets
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _bundle_copy(where: Path, url: str, hash_val: str) -> Path:
    """A copy of meduet_vae (its configs and large_files.yml) whose large_files.yml points the same entry at
    ``url`` with ``hash_val``; path and hash_type stay the zoo's."""
    root = where / "meduet_vae"
    shutil.copytree(CONFIGS, root / "configs")
    doc = yaml.safe_load((VAE_BUNDLE / "large_files.yml").read_text())
    (entry,) = doc["large_files"]
    entry.update(url=url, hash_val=hash_val)
    (root / "large_files.yml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def downloaded(maisi_file, served, tmp_path_factory) -> Path:
    """``download_large_files`` run on a bundle copy whose hash is the served file's: the fetched file."""
    url, gets = served
    bundle = _bundle_copy(tmp_path_factory.mktemp("ok"), url, _md5(maisi_file))
    bundle_scripts.download_large_files(bundle_path=str(bundle))
    assert len(gets) == 1
    return bundle / ZOO_AUTOENCODER["path"]


def test_download_large_files_fetches_and_checks_the_hash(maisi_file, served, downloaded, tmp_path):
    url, gets = served
    assert downloaded.relative_to(downloaded.parents[1]).as_posix() == "models/autoencoder_epoch273.pt"
    assert downloaded.read_bytes() == maisi_file.read_bytes()

    # the file already at the listed path with the listed hash: checked and kept, not fetched again
    n, mtime = len(gets), downloaded.stat().st_mtime_ns
    bundle_scripts.download_large_files(bundle_path=str(downloaded.parents[1]))
    assert len(gets) == n and downloaded.stat().st_mtime_ns == mtime

    # the right bytes under a wrong hash: fetched, refused, nothing left at the target
    wrong = _bundle_copy(tmp_path / "wrong", url, "0" * 32)
    with pytest.raises(HashCheckError, match="hash check of downloaded file failed"):
        bundle_scripts.download_large_files(bundle_path=str(wrong))
    assert len(gets) == n + 1 and not (wrong / ZOO_AUTOENCODER["path"]).exists()

    # a damaged copy already at the listed path: refused rather than used or silently replaced
    damaged = _bundle_copy(tmp_path / "damaged", url, _md5(maisi_file))
    target = damaged / ZOO_AUTOENCODER["path"]
    target.parent.mkdir()
    data = bytearray(maisi_file.read_bytes())
    data[-16:] = bytes(16)
    target.write_bytes(bytes(data))
    with pytest.raises(HashCheckError, match="hash check of existing file failed"):
        bundle_scripts.download_large_files(bundle_path=str(damaged))
    assert len(gets) == n + 1 and target.read_bytes() == bytes(data)


# ----------------------------------------------------------------------------------- loading through the config
def test_paper_preset_loads_the_file_and_encodes_deterministically(downloaded):
    parser = _vae_config("paper")
    parser["pretrained_ckpt"] = str(downloaded)
    parser["device"] = "$torch.device('cpu')"
    # train.yaml's `network`: with_pretrained(build_vae(@vae, **@vae_runtime), @pretrained_ckpt).to(@device)
    vae = parser.get_parsed_content("network").eval()

    # the file as the zoo loads it: strict, weights_only, into a plain AutoencoderKlMaisi (no convolution splits)
    reference = AutoencoderKlMaisi(**{**ZOO_AUTOENCODER_DEF, "norm_float16": False, "num_splits": 1})
    reference.load_state_dict(torch.load(downloaded, map_location="cpu", weights_only=True), strict=True)
    reference.eval()
    ours = {k: v for k, v in vae.state_dict().items() if k != "_extra_state"}
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # thin along the other axes to stay quick on CPU; the split axis (dim_split 1) has the preset's training crop
    # size: MAISI's split convolution needs >= 3 voxels per split at the 1/4-size level, which 4 splits of 64 give
    torch.manual_seed(1)
    split_len = parser.get_parsed_content("roi_size")[parser.get("vae_runtime")["dim_split"]]
    assert split_len == 64
    x = torch.rand(1, 1, 8, split_len, 8)
    with torch.no_grad():
        mu, sigma = vae.encode(x)
        again = vae.encode_mean(x)
        mu_ref, sigma_ref = reference.encode(x)
    assert mu.shape == sigma.shape == (1, 4, 2, 16, 2)
    assert torch.equal(again, mu)  # the latent mean: no sampling, same input -> same latent
    assert torch.allclose(mu, mu_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(sigma, sigma_ref, atol=1e-4, rtol=1e-4)
