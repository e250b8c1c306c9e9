"""A cohort's adaptation state as bytes, and back, without pickle.

What survives a server restart: the student's and the teacher's replaceable tensors,
the optimizers' state (momentum, Adam moments, step counts), the prompt's EMA, what the
devices were last sent, and the step count. The replay and held-out buffers do not: they
refill from new uploads within a few steps.

Tensors are encoded from whatever device they are on and decode onto the CPU: an engine on a
GPU moves optimizer state onto its device as it loads it (`Optimizer.load_state_dict` casts
state to each parameter's device), and keeps the rest on the CPU anyway.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from server.engine import CemaConfig, CohortState, ReplayBuffer
from shared.codec import pack, unpack
from shared.tensors import Tensor

MAX_STATE_BYTES = 1 << 30


def _plain(obj: Any) -> Any:
    """Tensors become tagged `Tensor` maps; maps keep non-string keys (optimizers index by int)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return {"tensor": Tensor.from_numpy(obj).model_dump()}
    if isinstance(obj, dict):
        return {"map": [[_plain(k), _plain(v)] for k, v in obj.items()]}
    if isinstance(obj, tuple):  # Adam's betas: load_state_dict keeps what it is given
        return {"tuple": [_plain(v) for v in obj]}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot persist a {type(obj).__name__}")


def _restore(obj: Any, as_torch: bool) -> Any:
    if isinstance(obj, dict):
        if "tensor" in obj:
            array = Tensor.model_validate(obj["tensor"]).to_numpy(finite=False)
            return torch.from_numpy(array) if as_torch else array
        if "tuple" in obj:
            return tuple(_restore(v, as_torch) for v in obj["tuple"])
        return {_restore(k, as_torch): _restore(v, as_torch) for k, v in obj["map"]}
    if isinstance(obj, list):
        return [_restore(v, as_torch) for v in obj]
    return obj


OPTIMIZERS = ("student_opt", "teacher_opt", "prompt_opt", "rival_opt")


def encode_state(state: CohortState) -> bytes:
    return pack({
        "student_norm": _plain(state.student_norm),
        "teacher_norm": _plain(state.teacher_norm),
        "teacher_ema": _plain(state.teacher_ema),
        "prompt_ema": _plain(state.prompt_ema),
        "published": _plain(state.published),
        "steps": state.steps,
        "learning": state.learning,
        "rival_norm": _plain(state.rival_norm),
        "rival_lead": state.rival_lead,
        "rival_lead_squares": state.rival_lead_squares,
        **{name: _plain(getattr(state, name)) for name in OPTIMIZERS},
    })


def decode_state(data: bytes, cfg: CemaConfig) -> CohortState:
    raw = unpack(data, max_bytes=MAX_STATE_BYTES)
    return CohortState(
        student_norm=_restore(raw["student_norm"], False),
        teacher_norm=_restore(raw["teacher_norm"], False),
        teacher_ema=_restore(raw.get("teacher_ema", {}), False),  # states stored before it existed have none
        prompt_ema=_restore(raw["prompt_ema"], False),
        published=_restore(raw["published"], False),
        steps=int(raw["steps"]),
        replay=ReplayBuffer(cfg.replay_capacity),
        holdout=ReplayBuffer(cfg.holdout_samples),
        learning=str(raw.get("learning", "")),  # states stored before learn="race" (then "auto") existed have no tracks
        rival_norm=_restore(raw.get("rival_norm", {"map": []}), False),
        rival_lead=float(raw.get("rival_lead", 0.0)),
        rival_lead_squares=float(raw.get("rival_lead_squares", 0.0)),
        **{name: _restore(raw.get(name, {"map": []}), True) for name in OPTIMIZERS},
    )
