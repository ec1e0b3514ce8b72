"""meduet_pretrain workflows: evaluate.yaml (``evaluate``, with ``swap``), extract.yaml and inference.json
(``extract``)."""
