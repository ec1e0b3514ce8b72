"""meduet_diffusion workflows: sample.yaml (``sample``), transfer.yaml (``transfer``), evaluate.yaml (``evaluate``);
what they share is in ``common``."""
