"""Networks: modules only (tensors in, tensors out). Importing this package registers every checkpoint kind with
``meduet.records`` (``meduet.records.load(path)`` rebuilds any of them from its file)."""

from meduet.networks import (  # noqa: F401 - registers the kinds
    controlnet, dit, dualflow, encoder, factor_prior, inr, mae, meduet, seg, vae)
