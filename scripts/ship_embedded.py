"""Retrain the embedded student and teacher and ship them: server/models/weights/<name>.pt.

Run after changing the training recipe or the synthetic generator (the tests fail until then),
then paste the printed lines into PACKAGED in server/models/embedded.py:
    python scripts/ship_embedded.py
"""
from __future__ import annotations

import hashlib

import torch

from server.models import embedded


def main() -> None:
    embedded.WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in embedded.CONFIGS:
        path = embedded.packaged_path(name)
        torch.save(embedded.train(name), path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f'    "{name}": Packaged("{embedded.CONFIGS[name].digest()}", "{sha}"),')


if __name__ == "__main__":
    main()
