"""The engine on a chosen torch device: resolving `--torch-device`, the same results on an explicit
CPU, state that survives persistence with a device, and a CUDA step that matches the CPU step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from server.augment import cotta_augment
from server.devices import resolve_torch_device
from server.engine import CemaConfig, CemaEngine, CohortState, StepInput
from server.persist import decode_state, encode_state
from server.prompt import InputPrompt, PromptedModel
from tests.conftest import tiny_pair
from tests.test_engine import _images

NO_CUDA = "no CUDA device: torch.cuda.is_available() is False (a CPU build of torch, or no GPU)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def test_resolver_cpu_and_auto() -> None:
    assert resolve_torch_device("cpu") == torch.device("cpu")
    assert resolve_torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_resolver_refuses_cuda_when_torch_has_none(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # what a CPU build of torch answers
    assert resolve_torch_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError) as caught:
        resolve_torch_device(spec)
    assert str(caught.value) == f"--torch-device {spec}: torch.cuda.is_available() is False (a CPU build of torch?)"


@pytest.mark.parametrize("spec", ["", "gpu", "CUDA", "Cpu", "cuda:", "cuda:-1", "cuda:x", "cuda0", "mps", " cpu"])
def test_resolver_refuses_other_strings(spec: str) -> None:
    with pytest.raises(ValueError, match="must be cpu, cuda, cuda:N or auto"):
        resolve_torch_device(spec)


def _engine(device: torch.device | str | None, prompted: bool = False, **cfg) -> CemaEngine:
    student, teacher = tiny_pair()
    if prompted:
        student = PromptedModel(student, InputPrompt("padding", 4, (32, 32)))
    config = CemaConfig(**{"num_classes": 10, "new_per_step": 8, "replay_per_step": 8, "replay_min": 8, **cfg})
    if device is None:
        return CemaEngine(student, teacher, config, seed=3)
    return CemaEngine(student, teacher, config, seed=3, torch_device=device)


def _run(engine: CemaEngine, states: list[CohortState], steps: range) -> list[list[dict[str, np.ndarray]]]:
    """`steps` rounds of one batched step for every cohort: the first on the cloud's statistics,
    the second on batch statistics, the rest on the device's running statistics."""
    stats = {k: v * 1.1 + 0.01 for k, v in engine.new_state().student_norm.items() if k.endswith(("_mean", "_var"))}
    modes = [(None, False), (None, True), (stats, False)]
    out = []
    for step in steps:
        inputs = [StepInput(_images(8 + i, seed=10 * step + i), state, *modes[min(i, 2)]) for i, state in enumerate(states)]
        out.append([result.tensors for result in engine.step_many(inputs)])
    return out


def _assert_close(a: list[list[dict[str, np.ndarray]]], b: list[list[dict[str, np.ndarray]]], **tol) -> None:
    for round_a, round_b in zip(a, b, strict=True):
        for delta_a, delta_b in zip(round_a, round_b, strict=True):
            assert delta_a.keys() == delta_b.keys()
            for name in delta_a:
                assert isinstance(delta_b[name], np.ndarray)
                np.testing.assert_allclose(delta_a[name], delta_b[name], err_msg=name, **tol)


@pytest.mark.parametrize("prompted", [False, True])
def test_an_explicit_cpu_device_equals_the_default(prompted: bool) -> None:
    cfg = {"teacher_augmentations": 2, "learn": "norm+prompt" if prompted else "norm"}
    default, explicit = _engine(None, prompted, **cfg), _engine(torch.device("cpu"), prompted, **cfg)
    assert default.device == explicit.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in explicit.student.parameters())
    runs = [_run(engine, [engine.new_state() for _ in range(3)], range(3)) for engine in (default, explicit)]
    _assert_close(*runs, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_state_round_trips_through_persist_from_and_onto_the_device(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state trained on `device` encodes (its optimizer tensors live there), decodes onto the
    CPU, and a restarted engine on the same device continues as if never stopped (the replay
    buffer, which is not persisted, stays below its minimum here)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    cfg = {"teacher_optimizer": "adam", "teacher_lr": 1e-3, "replay_min": 1000}
    engine = _engine(device, **cfg)
    states = [engine.new_state() for _ in range(3)]
    _run(engine, states, range(2))
    assert {t.device.type for s in states for t in _tensors(s.teacher_opt)} == {torch.device(device).type}
    restored = [decode_state(encode_state(s), engine.cfg) for s in states]
    assert {t.device.type for s in restored for t in _tensors(s.teacher_opt)} == {"cpu"}
    twin = _engine(device, **cfg)  # a restarted server's engine
    _assert_close(_run(engine, states, range(2, 4)), _run(twin, restored, range(2, 4)), rtol=0, atol=1e-5)
    assert {t.device.type for s in restored for t in _tensors(s.teacher_opt)} == {torch.device(device).type}


def _tensors(opt_state: dict) -> list[torch.Tensor]:
    """The optimizer's per-parameter tensors (Adam's `step` count stays on the CPU by torch's design)."""
    return [t for slots in opt_state["state"].values() for slot, t in slots.items() if slot != "step"]


@needs_cuda
@pytest.mark.parametrize("prompted", [False, True])
def test_a_cuda_step_equals_the_cpu_step(prompted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real steps on CUDA (teacher batched across three cohorts in three normalization modes,
    replay; a prompted student's prompt on the device too) give the CPU's deltas and teacher
    state, to float32 rounding. TF32 is off and cuDNN deterministic, so the two compute the same
    thing: those are precision choices, not the device's. No augmented views: their noise is
    drawn on the GPU there (`test_augmented_views_on_cuda`)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"torch sees {count} CUDA device"):
        resolve_torch_device(f"cuda:{count}")
    cfg = {"teacher_augmentations": 0, "teacher_lr": 5e-2, "student_lr": 5e-2}  # SGD: no Adam sign flips near 0
    cpu, cuda = _engine("cpu", prompted, **cfg), _engine(resolve_torch_device("cuda"), prompted, **cfg)
    assert all(p.device.type == "cuda" for p in [*cuda.student.parameters(), *cuda.teacher.parameters()])
    states_cpu, states_cuda = [cpu.new_state() for _ in range(3)], [cuda.new_state() for _ in range(3)]
    on_cpu, on_cuda = _run(cpu, states_cpu, range(3)), _run(cuda, states_cuda, range(3))
    atol = 5e-5  # CPU against CPU with 1 or 2 threads differs by < 3e-7 here
    _assert_close(on_cpu, on_cuda, rtol=0, atol=atol)
    source = cpu.source_delta()
    moved = max(np.abs(delta[k] - source[k]).max() for delta in on_cpu[-1] for k in source if k.endswith((".weight", ".bias")))
    assert moved > 40 * atol  # the steps moved the affine parameters far beyond the tolerance
    for a, b in zip(states_cpu, states_cuda):
        for name, value in a.teacher_norm.items():
            np.testing.assert_allclose(value, b.teacher_norm[name], rtol=0, atol=atol, err_msg=name)



@needs_cuda
def test_augmented_views_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA view is the CPU's view (the same colour, geometry and flip from the same generator)
    plus noise drawn on the GPU, of the scale asked for and reproducible from the generator; and
    augmented CUDA steps are reproducible from the engine's seed."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    plain = [cotta_augment(x.to(d), torch.Generator().manual_seed(5), noise_std=0.0) for d in ("cpu", "cuda")]
    assert plain[1].device.type == "cuda"
    np.testing.assert_allclose(plain[0].numpy(), plain[1].cpu().numpy(), rtol=0, atol=1e-5)
    noisy = [cotta_augment(x.cuda(), torch.Generator().manual_seed(5), noise_std=0.05) for _ in range(2)]
    assert noisy[0].device.type == "cuda" and torch.equal(noisy[0], noisy[1])
    residual = (noisy[0] - plain[1])[(plain[1] > 0.2) & (plain[1] < 0.8)]  # away from the clamps
    assert 0.045 < residual.std().item() < 0.055
    cfg = {"teacher_augmentations": 2, "teacher_lr": 5e-2, "student_lr": 5e-2}
    runs = []
    for _ in range(2):
        engine = _engine(resolve_torch_device("cuda"), **cfg)
        runs.append(_run(engine, [engine.new_state() for _ in range(3)], range(2)))
    _assert_close(*runs, rtol=0, atol=1e-6)
    source = _engine("cpu", **cfg).source_delta()
    assert max(np.abs(runs[0][-1][0][k] - source[k]).max() for k in source if k.endswith((".weight", ".bias"))) > 1e-3
