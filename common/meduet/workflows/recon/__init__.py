"""meduet_recon workflows: simulate.yaml (``simulate``: measurement files of a clean volume) and reconstruct.yaml /
inference.json (``reconstruct``: a measurement file and its acquisition JSON in, a NIfTI reconstruction out)."""
