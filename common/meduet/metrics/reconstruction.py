"""Reconstruction quality: PSNR, SSIM, MS-SSIM (MONAI metrics) and the patch-seam error of patch-wise coding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import MultiScaleSSIMMetric, PSNRMetric, SSIMMetric

from meduet.networks.patchwise import tile_borders as window_borders  # where MONAI's windows begin and end

__all__ = ["reconstruction_metrics", "anatomy_fidelity", "window_borders", "patch_border_mask", "seam_error"]


def reconstruction_metrics(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """PSNR, SSIM and MS-SSIM of one or more volumes ``(B, C, H, W, D)`` in ``[0, data_range]``, batch-averaged.

    MS-SSIM needs volumes larger than its 5 scales allow; for small volumes the number of scales (and
    kernel) is reduced, which the key ``ms_ssim_scales`` reports.
    """
    pred = pred.float().clamp(0, data_range)
    target = target.float()
    psnr = PSNRMetric(max_val=data_range)(pred, target).mean().item()
    ssim = SSIMMetric(spatial_dims=3, data_range=data_range)(pred, target).mean().item()
    min_side = min(pred.shape[2:])
    # each MS-SSIM scale halves the volume; the kernel (size 11 by default) must fit the coarsest one
    # and MONAI's own size check (side // (scales - 1)^2 > kernel - 1) must pass as well
    def fits(scales: int, kernel: int) -> bool:
        return min_side // 2 ** (scales - 1) >= kernel and min_side // max(1, scales - 1) ** 2 > kernel - 1

    scales, kernel = 5, 11
    while scales > 1 and not fits(scales, kernel):
        scales -= 1
    while kernel > 3 and not fits(scales, kernel):
        kernel -= 2
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights = (weights / weights.sum()).tolist()
    msssim = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=kernel, weights=weights)(
        pred, target
    ).mean().item()
    return {"psnr": psnr, "ssim": ssim, "ms_ssim": msssim, "ms_ssim_scales": scales}


def anatomy_fidelity(recon: torch.Tensor, image: torch.Tensor, noise_free: torch.Tensor, label: torch.Tensor,
                     classes: dict[str, int], shell: int = 2, data_range: float = 1.0) -> dict[str, float]:
    """How much of the anatomy a reconstruction keeps, told apart from the noise it does not copy.

    All inputs are one volume on one grid, shape ``(..., X, Y, Z)`` (leading singleton dims allowed), intensities in
    ``[0, data_range]``: ``image`` the (noisy) input, ``noise_free`` the same scan without noise (a phantom's
    noise-free render), ``label`` its label map.

    Returns:
        ``psnr``: reconstruction vs the input (what ``evaluate.yaml`` reports);
        ``psnr_noise_free``: reconstruction vs the noise-free scan (the anatomy kept);
        ``psnr_ceiling``: the noise-free scan vs the input -- the PSNR a reconstruction of the anatomy alone
        (no noise) scores, so ``psnr`` near it means nothing but the noise is lost;
        ``contrast_kept_<name>`` per class of ``classes``: the class's mean minus the mean of its surroundings (the
        labelled, non-background voxels within ``shell`` voxels outside it), in the reconstruction over the same in
        the noise-free scan -- 1 = the structure stands out from what surrounds it as it should, 0 = it vanished;
        NaN when the class is absent or its noise-free contrast is below 1 % of ``data_range``.
    """
    spatial = tuple(recon.shape[-3:])
    if not (tuple(image.shape[-3:]) == tuple(noise_free.shape[-3:]) == tuple(label.shape[-3:]) == spatial):
        raise ValueError("anatomy_fidelity: recon, image, noise_free and label must be on the same grid")
    # on the CPU: the inputs may come from different devices (a CUDA reconstruction, a NumPy reference)
    recon, image, noise_free = (torch.as_tensor(t).detach().float().cpu().reshape(spatial)
                                for t in (recon, image, noise_free))
    label = torch.as_tensor(label).detach().cpu().reshape(spatial)
    recon = recon.clamp(0, data_range)

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = float((a - b).pow(2).mean())
        return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)

    out = {"psnr": psnr(recon, image), "psnr_noise_free": psnr(recon, noise_free),
           "psnr_ceiling": psnr(noise_free, image)}
    for name, k in classes.items():
        inside = label == k
        grown = torch.nn.functional.max_pool3d(inside[None, None].float(), 2 * shell + 1, 1, shell)[0, 0] > 0
        around = grown & ~inside & (label > 0)
        if not bool(inside.any()) or not bool(around.any()):
            out[f"contrast_kept_{name}"] = float("nan")
            continue
        want = float(noise_free[inside].mean() - noise_free[around].mean())
        got = float(recon[inside].mean() - recon[around].mean())
        out[f"contrast_kept_{name}"] = got / want if abs(want) >= 0.01 * data_range else float("nan")
    return out


def patch_border_mask(shape: Sequence[int], patch_size: Sequence[int] | int | None = None, width: int = 1,
                      overlap: Sequence[float] | float = 0.0,
                      borders: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Boolean mask of voxels within ``width`` voxels of an interior window border of patch-wise coding with MONAI
    sliding windows of ``patch_size`` and ``overlap`` (a fraction, or one per axis; ``window_borders``; the volume's
    own faces are not borders), or of the given per-axis ``borders`` (e.g. ``PatchEncoding.borders``)."""
    if borders is None:
        if patch_size is None:
            raise ValueError("patch_border_mask needs patch_size or borders")
        ps = [patch_size] * len(shape) if isinstance(patch_size, int) else list(patch_size)
        ov = [overlap] * len(shape) if isinstance(overlap, (int, float)) else list(overlap)
        borders = [window_borders(n, p, o) for n, p, o in zip(shape, ps, ov)]
    mask = torch.zeros(tuple(shape), dtype=torch.bool)
    for axis, (n, axis_borders) in enumerate(zip(shape, borders)):
        for b in axis_borders:
            lo, hi = max(0, b - width), min(n, b + width)
            index = [slice(None)] * len(shape)
            index[axis] = slice(lo, hi)
            mask[tuple(index)] = True
    return mask


def seam_error(
    pred: torch.Tensor, target: torch.Tensor, patch_size: Sequence[int] | int | None = None, width: int = 1,
    overlap: Sequence[float] | float = 0.0, borders: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """Mean absolute error on voxels at window borders vs elsewhere, and their ratio (1.0 = no visible seam).

    ``pred``/``target``: ``(B, C, H, W, D)``; ``patch_size`` and ``overlap``: the image-space windows of the
    patch-wise encoding (``patch_border_mask``: the borders MONAI's sliding windows really have), or ``borders``
    per axis (``PatchEncoding.borders``: encoding and decoding windows).
    """
    err = (pred.float() - target.float()).abs().mean(dim=(0, 1))
    mask = patch_border_mask(err.shape, patch_size, width, overlap, borders)
    if not mask.any() or mask.all():
        return {"seam_border_mae": float("nan"), "seam_interior_mae": float(err.mean()), "seam_ratio": float("nan")}
    border = float(err[mask].mean())
    interior = float(err[~mask].mean())
    return {"seam_border_mae": border, "seam_interior_mae": interior, "seam_ratio": border / max(interior, 1e-12)}
