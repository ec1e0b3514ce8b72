"""meduet_vae workflows: evaluate.yaml (``evaluate``) and encode.yaml (``encode``)."""
