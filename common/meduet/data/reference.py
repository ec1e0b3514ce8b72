"""Noise-free references of the generated phantoms: the same scans as ``meduet.data.sample`` wrote, without noise.

A reconstruction of the anatomy alone scores ``PSNR(noise_free, image)`` against a noisy phantom, not infinity; the
VAE evaluation uses these references to tell anatomy lost from noise not copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np

from meduet.data.phantoms import ANATOMY, bias_field, make_anatomy, make_site_styles, render
from meduet.data.sample import phantom_affine
from meduet.errors import MeduetInputError

__all__ = ["noise_free_phantom"]


def noise_free_phantom(datalist_file: str | os.PathLike, item: dict) -> tuple[np.ndarray, np.ndarray]:
    """The phantom of a datalist ``item`` as its site renders it *without noise*: ``(volume in HU, affine)``.

    Same subject, site, contrast table, blur and bias field as the image the generator wrote, only
    ``noise_std = 0`` -- so ``image - noise_free`` is exactly that image's Gaussian noise. Reconstruction reports
    use it to tell anatomy lost from noise not copied (a reconstruction of the anatomy alone scores
    ``PSNR(noise_free, image)`` against the noisy image, not infinity). Reads the generator parameters from
    ``sample.json`` next to the datalist's folder; for any other datalist it raises a one-line error.
    """
    datalist_file = os.path.abspath(os.fspath(datalist_file))
    record_file = os.path.join(os.path.dirname(os.path.dirname(datalist_file)), "sample.json")
    try:
        with open(record_file, encoding="utf-8") as f:
            params = json.load(f)["params"]
        seed, size, n_sites = int(params["seed"]), int(params["size"]), int(params["sites"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MeduetInputError(f"{datalist_file}: not phantoms written by meduet.data.sample ({record_file}: {e}); "
                               "a noise-free render exists only for the generated phantoms") from None
    by_name = {s.name: s for s in make_site_styles(seed, n_sites)}
    subject = str(item.get("subject", ""))
    if item.get("domain") not in by_name or not (subject[:1] == "s" and subject[1:].isdigit()):
        raise MeduetInputError(f"{datalist_file}: item {item.get('image')!r} is not a generated phantom "
                               f"(domain {item.get('domain')!r}, subject {subject!r})")
    site = by_name[item["domain"]]
    age = item.get("age")  # a longitudinal cohort visit: the subject at that age, with or without its lesions
    label = make_anatomy(np.random.default_rng([seed, ANATOMY, int(subject[1:])]), size,
                         age=None if age is None else float(age), lesions=bool(item.get("lesion", 1)))
    image = render(label, replace(site, noise_std=0.0), bias_field(seed, site, size), np.random.default_rng(0))
    return image, phantom_affine(size)
