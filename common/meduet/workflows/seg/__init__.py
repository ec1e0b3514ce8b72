"""meduet_seg workflows: evaluate.yaml (``evaluate``); inference.json uses MONAI's evaluator with
``meduet.deploy`` writers."""
