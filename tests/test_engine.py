"""The cloud step as pure functions: what a delta carries in each device normalization mode,
the replay groups, and the teacher's options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine import (
    BATCH_STATISTICS_MIN_SAMPLES,
    CemaConfig,
    CemaEngine,
    ReplayBuffer,
    ReplayGroup,
    StepInput,
    conv_rates,
    fair_differences,
    rival_leads,
    student_passes,
)
from tests.conftest import tiny_pair


def _engine(**cfg) -> CemaEngine:
    student, teacher = tiny_pair()
    defaults = {"new_per_step": 8, "replay_per_step": 8, "replay_min": 8}
    return CemaEngine(student, teacher, CemaConfig(num_classes=10, **(defaults | cfg)))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_replay_buffer_is_bounded_in_samples_and_draws_samples_with_their_groups_statistics() -> None:
    buffer = ReplayBuffer(capacity=20)
    for i in range(5):
        buffer.add(ReplayGroup(np.full((8, 2, 2, 3), i, np.uint8), np.full((8, 10), i, np.float32), {"s": np.array([i])}))
    assert buffer.size == 16 and len(buffer.groups) == 2  # the oldest groups went first
    drawn = buffer.sample(12, np.random.default_rng(0))
    assert sum(len(g.images) for g in drawn) == 12
    for g in drawn:  # a drawn sample keeps the statistics of the group it came from, and its soft labels
        value = int(g.images[0, 0, 0, 0])
        assert (g.images == value).all() and (g.probs == value).all() and g.stats["s"][0] == value
    assert sum(len(g.images) for g in buffer.sample(100, np.random.default_rng(1))) == 16  # all, each once


def test_replay_draws_uniformly_over_samples_not_groups() -> None:
    buffer = ReplayBuffer(capacity=10_000)
    sizes = [4, 32, 8, 64, 1, 16]
    for i, n in enumerate(sizes):
        buffer.add(ReplayGroup(np.full((n, 1, 1, 1), i, np.uint8), np.zeros((n, 10), np.float32), None))
    rng = np.random.default_rng(0)
    drawn = np.zeros(len(sizes))
    draws = 2000
    for _ in range(draws):
        groups = buffer.sample(12, rng)
        assert len({int(g.images[0, 0, 0, 0]) for g in groups}) == len(groups)  # one entry per source group
        for g in groups:
            drawn[int(g.images[0, 0, 0, 0])] += len(g.images)
    expected = draws * 12 * np.array(sizes) / sum(sizes)
    # whole-group draws (before) gave every group about the same count: the 1-sample group ~1/6
    np.testing.assert_allclose(drawn, expected, rtol=0.1, atol=30)


def test_replayed_batch_statistics_samples_come_in_whole_groups_drawn_in_proportion_to_size() -> None:
    buffer = ReplayBuffer(capacity=10_000)
    sizes = [16, 64, 32, 16]  # batch-statistics groups 0-3, then eval-mode groups 4-5
    for i, n in enumerate(sizes):
        buffer.add(ReplayGroup(np.full((n, 1, 1, 1), i, np.uint8), np.full((n, 10), i, np.float32), None, batch_statistics=True))
    for i in (4, 5):
        buffer.add(ReplayGroup(np.full((64, 1, 1, 1), i, np.uint8), np.full((64, 10), i, np.float32), {"s": np.array([i])}))
    rng = np.random.default_rng(3)
    counts = np.zeros(len(sizes))
    for _ in range(1000):
        drawn = buffer.sample(48, rng)
        for g in drawn:
            source = int(g.images[0, 0, 0, 0])
            assert (g.images == source).all() and (g.probs == source).all()  # one stored group, with its labels
            if g.batch_statistics:  # never a batch of a few images: their statistics would be noise
                assert len(g.images) >= min(BATCH_STATISTICS_MIN_SAMPLES, sizes[source])
                counts[source] += len(g.images)
            else:
                assert (g.images == g.stats["s"][0]).all()
    share = counts / counts.sum()
    np.testing.assert_allclose(share, np.array(sizes) / sum(sizes), atol=0.08)  # about equally likely (the cut skews it a little)


@pytest.mark.parametrize("mode", ["cloud", "running", "batch"])
def test_step_returns_what_the_device_needs(mode: str) -> None:
    engine = _engine()
    state = engine.new_state()
    stats_names = [k for k in state.student_norm if k.endswith(("running_mean", "running_var"))]
    device_stats = {k: state.student_norm[k] * 1.2 + 0.01 for k in stats_names} if mode == "running" else None
    before = {k: v.copy() for k, v in state.student_norm.items()}
    for seed in range(3):  # the third step replays earlier groups
        delta = engine.step(_images(8, seed), state, device_stats, batch_statistics=mode == "batch").tensors
    affine_only = all(k.endswith((".weight", ".bias")) for k in delta)
    assert affine_only == (mode != "cloud")
    assert any(np.abs(delta[k] - before[k]).max() > 0 for k in delta if k.endswith(".weight"))
    if mode == "running":  # the state keeps the device's statistics, not its own estimate
        np.testing.assert_allclose(state.student_norm[stats_names[0]], device_stats[stats_names[0]])
    if mode == "cloud":
        assert np.abs(delta[stats_names[0]] - before[stats_names[0]]).max() > 0
    assert state.replay.size == 24 and state.steps == 3


def test_teacher_options_change_the_soft_labels() -> None:
    images = _images(8, 5)
    plain = _engine(adapt_teacher=False, teacher_flip_average=False)
    views = _engine(adapt_teacher=False, teacher_flip_average=True, teacher_augmentations=4)
    [p_plain] = plain.teacher_probs([(images, plain.new_state())])
    [p_views] = views.teacher_probs([(images, views.new_state())])
    assert torch.allclose(p_plain.sum(dim=1), torch.ones(8)) and torch.allclose(p_views.sum(dim=1), torch.ones(8))
    assert (p_plain - p_views).abs().max() > 1e-4
    adam = _engine(teacher_optimizer="adam", teacher_lr=1e-3)
    state = adam.new_state()
    adam.teacher_probs([(images, state)])
    assert "exp_avg" in str(state.teacher_opt) and any(
        np.abs(state.teacher_norm[k] - adam._source_teacher[k]).max() > 0 for k in state.teacher_norm if k.endswith(".weight")
    )
    with pytest.raises(ValueError, match="unknown optimizer"):
        _engine(teacher_optimizer="rmsprop").teacher_probs([(images, adam.new_state())])


def test_one_batched_teacher_pass_equals_separate_passes_per_cohort() -> None:
    """Batching the teacher across cohorts must not mix them: each keeps its own batch
    statistics, affine parameters and optimizer state, step after step."""
    together, apart = _engine(teacher_lr=1e-2), _engine(teacher_lr=1e-2)
    sizes = (8, 5, 12)
    states_t = [together.new_state() for _ in sizes]
    states_a = [apart.new_state() for _ in sizes]
    for step in range(3):
        batches = [_images(n, seed=10 * step + i) for i, n in enumerate(sizes)]
        batched = together.teacher_probs(list(zip(batches, states_t)))
        separate = [apart.teacher_probs([(x, st)])[0] for x, st in zip(batches, states_a)]
        for b, s in zip(batched, separate):
            torch.testing.assert_close(b, s, atol=1e-5, rtol=1e-4)
    for st, sa in zip(states_t, states_a):
        for name in together._teacher_affine:
            np.testing.assert_allclose(st.teacher_norm[name], sa.teacher_norm[name], atol=1e-5)
    moved = [k for k in together._teacher_affine if np.abs(states_t[0].teacher_norm[k] - states_t[1].teacher_norm[k]).max() > 1e-6]
    assert moved, "cohorts that saw different images must have adapted differently"


def test_an_ensemble_teacher_adapts_every_member_for_each_cohort_apart() -> None:
    """The ensemble's members are one module to the engine: each cohort's batch statistics and
    affine parameters cover every member, and adapting one cohort leaves the other's alone."""
    from server.models.registry import LogitEnsemble

    student, teacher = tiny_pair()
    _, second = tiny_pair()
    engine = CemaEngine(student, LogitEnsemble([teacher, second]), CemaConfig(num_classes=10, new_per_step=8,
                                                                               replay_per_step=8, replay_min=8, teacher_lr=1e-2))
    first, other = engine.new_state(), engine.new_state()
    members = {name.split(".")[1] for name in first.teacher_norm}
    assert members == {"0", "1"}
    engine.step_many([StepInput(_images(8, 1), first), StepInput(_images(8, 2), other)])
    engine.step(_images(8, 3), first)
    for member in members:
        moved = [k for k in engine._teacher_affine if k.split(".")[1] == member
                 and np.abs(first.teacher_norm[k] - engine._source_teacher[k]).max() > 0]
        assert moved, f"member {member} did not adapt"
    assert any(np.abs(first.teacher_norm[k] - other.teacher_norm[k]).max() > 1e-6 for k in engine._teacher_affine)


def _prompted_engine(learn: str) -> CemaEngine:
    from server.prompt import InputPrompt, PromptedModel

    student, teacher = tiny_pair()
    prompted = PromptedModel(student, InputPrompt("lowres", 4, (32, 32)))
    return CemaEngine(prompted, teacher, CemaConfig(num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8,
                                                    learn=learn))


@pytest.mark.parametrize("learn", ["prompt", "norm+prompt"])
def test_prompt_modes_ship_the_prompt_ema(learn: str) -> None:
    engine = _prompted_engine(learn)
    state = engine.new_state()
    delta = engine.step(_images(8), state, batch_statistics=True).tensors
    assert ("prompt.lowres" in delta) and any(k.endswith(".weight") for k in delta) == (learn == "norm+prompt")
    raw = state.student_norm["prompt.lowres"]
    assert np.abs(raw).max() > 0  # the prompt learnt something
    np.testing.assert_allclose(delta["prompt.lowres"], 0.1 * raw, rtol=1e-5, atol=1e-8)  # EMA 0.9 from zero
    frozen = {k: v for k, v in state.student_norm.items() if k.endswith(".weight")}
    if learn == "prompt":  # the student's own tensors never move
        assert all(np.array_equal(v, engine._source_student[k]) for k, v in frozen.items())


def test_prompt_learning_needs_a_prompted_student() -> None:
    with pytest.raises(ValueError, match="prompted student"):
        _engine(learn="prompt")
    with pytest.raises(ValueError, match="learn must be"):
        CemaConfig(num_classes=10, learn="weights")


def test_alternating_mode_trains_norm_then_prompt() -> None:
    engine = _prompted_engine("norm/prompt")
    state = engine.new_state()
    weight = next(k for k in state.student_norm if k.endswith(".weight"))
    engine.step(_images(8, 1), state, batch_statistics=True)  # step 0: norm
    assert not np.array_equal(state.student_norm[weight], engine._source_student[weight])
    assert not np.abs(state.student_norm["prompt.lowres"]).any()
    after_norm = state.student_norm[weight].copy()
    delta = engine.step(_images(8, 2), state, batch_statistics=True).tensors  # step 1: prompt
    np.testing.assert_array_equal(state.student_norm[weight], after_norm)
    assert np.abs(state.student_norm["prompt.lowres"]).max() > 0 and {weight, "prompt.lowres"} <= set(delta)


def test_conv_mode_moves_and_ships_every_convolution_weight_and_nothing_else_of_the_student() -> None:
    from server.norm import conv_weights, for_the_wire, learn_conv_weights

    student, teacher = tiny_pair()
    engine = CemaEngine(learn_conv_weights(student), teacher, CemaConfig(
        num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8, learn="norm+conv"))
    convs = set(conv_weights(engine.student))
    assert convs and convs <= set(engine.new_state().student_norm)
    frozen = {n: p.detach().clone() for n, p in engine.student.named_parameters() if n not in convs and not p.requires_grad}
    assert frozen  # e.g. the classifier
    state = engine.new_state()
    delta = engine.step(_images(8), state, batch_statistics=True).tensors
    assert convs <= set(delta)
    assert all(np.abs(state.student_norm[k] - engine._source_student[k]).max() > 0 for k in convs)  # every convolution learnt
    for name, value in delta.items():  # convolutions travel as float16, rounded from the float32 masters
        assert value.dtype == (np.float16 if name in convs else np.float32), name
        if name in convs:
            np.testing.assert_array_equal(value, state.student_norm[name].astype(np.float16))
    big = {name: np.full_like(state.student_norm[name], 7e4) for name in sorted(convs)[:1]}
    assert for_the_wire(big, engine.student)[next(iter(big))].dtype == np.float32  # float16 cannot hold it: stays float32
    teacher_convs = {f"{n}.weight" for n, m in engine.teacher.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert teacher_convs and not teacher_convs & set(state.teacher_norm)  # the teacher stays affine-only
    assert all(torch.equal(p, frozen[n]) for n, p in engine.student.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="marked learnt"):  # the mode and the student must agree, both ways
        _engine(learn="norm+conv")
    student, teacher = tiny_pair()
    with pytest.raises(ValueError, match="marked learnt"):
        CemaEngine(learn_conv_weights(student), teacher, CemaConfig(num_classes=10))


def test_the_rival_track_must_lead_by_z_standard_errors() -> None:
    """The paired test behind learn="race": a steady lead passes, the same share of wins drawn
    as noise does not, a lead fades when the evidence stops, and a losing rival never leads."""
    lead, squares = 0.0, 0.0
    for _ in range(3):  # 40 uploads a step, the rival right on 4 more of them: 12 of 120, standard error ~3.5
        lead, squares, leads = rival_leads(lead, squares, np.r_[np.ones(4), np.zeros(36)], 0.999, 2.0)
    assert leads and lead == pytest.approx(12 * (1 + 0.999**40 + 0.999**80) / 3, rel=1e-6)
    noise = np.r_[np.ones(10), -np.ones(8), np.zeros(22)]  # +2 on 40, but 18 disagreements: standard error ~4.2
    assert not rival_leads(0.0, 0.0, noise, 0.999, 2.0)[2]
    assert rival_leads(0.0, 0.0, np.tile(noise, 25), 0.999, 2.0)[2]  # 25 times the evidence (+50, error ~21): it leads
    faded = rival_leads(12.0, 12.0, np.zeros(4000), 0.999, 2.0)
    assert faded[0] == pytest.approx(12.0 * 0.999**4000) and faded[0] < 0.3
    assert not rival_leads(0.0, 0.0, -np.ones(100), 0.999, 2.0)[2]
    assert not rival_leads(0.0, 0.0, np.zeros(40), 0.999, 2.0)[2]  # no disagreement, no lead


def test_tracks_are_compared_only_where_both_are_unsure() -> None:
    """The uploads are what the published track is unsure of; where the rival is confident it
    would not have been uploaded had it been published, so those uploads do not count."""
    def probs(top: int, p: float) -> np.ndarray:
        row = np.full(10, (1 - p) / 9)
        row[top] = p
        return row

    teacher = np.array([0, 1, 2, 3])
    published = np.stack([probs(5, 0.4), probs(5, 0.5), probs(2, 0.3), probs(3, 0.45)])  # unsure: entropy 1.8-2.2
    rival = np.stack([probs(0, 0.99), probs(1, 0.45), probs(7, 0.35), probs(3, 0.4)])
    # upload 0: the rival is right but confident (H 0.1): left out; 1: the rival right, the published wrong: +1;
    # 2: the published right, the rival wrong: -1; 3: both right: 0
    np.testing.assert_array_equal(fair_differences(published, rival, teacher), [1.0, -1.0, 0.0])
    assert fair_differences(published, published, teacher).tolist() == [0.0] * 4


def test_auto_learns_both_tracks_and_ships_the_one_the_devices_run() -> None:
    """learn="race": the affine track is published first, and its deltas leave the convolutions
    out (at their source values, which a device takes from its model file); the rival trains its
    convolutions beside it. Once the rival leads significantly, the devices get its tensors, with an event saying why;
    each track keeps its own tensors and optimizer, and the evidence starts afresh."""
    from server.norm import conv_weights, learn_conv_weights

    student, teacher = tiny_pair()
    engine = CemaEngine(learn_conv_weights(student), teacher, CemaConfig(
        num_classes=10, new_per_step=8, replay_per_step=8, replay_min=8, learn="race", track_memory=1.0))
    convs, source = set(conv_weights(engine.student)), engine._source_student
    state = engine.new_state()
    assert state.learning == "norm" and set(state.rival_norm) == set(state.student_norm)
    result = engine.step(_images(8), state, batch_statistics=True)
    assert state.learning == "norm" and state.rival_lead == 0.0  # identical tracks until the first step: no lead
    assert not convs & set(result.tensors)  # published: affine only, the convolutions at the source
    for name in convs:  # the rival learnt its own
        np.testing.assert_array_equal(state.student_norm[name], source[name])
        assert np.abs(state.rival_norm[name] - source[name]).max() > 0
    assert any(np.abs(state.student_norm[k] - source[k]).max() > 0 for k in set(source) - convs)

    state.rival_lead, state.rival_lead_squares = 100.0, 100.0  # evidence the rival agrees more (memory 1: kept)
    rival = {k: v.copy() for k, v in state.rival_norm.items()}
    result = engine.step(_images(8, 2), state, batch_statistics=True)
    assert result.event == "track" and "norm+conv" in result.detail and state.learning == "norm+conv"
    assert state.rival_lead == state.rival_lead_squares == 0.0
    optimised = {track: sum(len(g["params"]) for g in opt["param_groups"])
                 for track, opt in (("conv", state.student_opt), ("affine", state.rival_opt))}
    assert optimised["conv"] == optimised["affine"] + len(convs)  # each track kept its optimizer
    for name in convs:  # the devices now get the conv track's convolutions, one step on from where it was
        np.testing.assert_array_equal(result.tensors[name], state.student_norm[name].astype(np.float16))
        assert not np.array_equal(state.student_norm[name], rival[name])
        np.testing.assert_array_equal(state.rival_norm[name], source[name])  # the affine track never moves them


def test_prompt_specs_are_checked() -> None:
    from server.prompt import InputPrompt, parse_prompt

    assert parse_prompt("lowres:8") == ("lowres", 8) and parse_prompt("none") is None and parse_prompt(None) is None
    for bad in ("lowres", "lowres:0", "frame:4", "padding:x"):
        with pytest.raises(ValueError, match="prompt must be"):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="does not fit"):
        InputPrompt("padding", 16, (32, 32))


def test_step_reports_the_teachers_label_for_each_new_upload() -> None:
    engine = _engine(adapt_teacher=False)
    images = _images(8, 7)
    result = engine.step(images, engine.new_state())
    [probs] = engine.teacher_probs([(images, engine.new_state())])  # the same unadapted teacher, the same images
    assert result.teacher_classes.shape == (8,)
    np.testing.assert_array_equal(result.teacher_classes, probs.argmax(dim=1).numpy())


@pytest.mark.parametrize("source", ["ema", "both"])
def test_distilling_from_the_teachers_ema_keeps_and_persists_it(source: str) -> None:
    from server.persist import decode_state, encode_state

    engine = _engine(distil_from=source, teacher_ema=0.5, teacher_lr=0.05)
    plain = _engine(teacher_lr=0.05)
    state, plain_state = engine.new_state(), plain.new_state()
    for seed in range(2):
        result = engine.step(_images(8, seed), state)
        plain_result = plain.step(_images(8, seed), plain_state)
    name = max(state.teacher_ema, key=lambda k: np.abs(state.teacher_norm[k] - engine._source_teacher[k]).max())
    # after two steps the EMA sits strictly between the source and the adapted teacher
    source_value, adapted = engine._source_teacher[name], state.teacher_norm[name]
    assert np.abs(adapted - source_value).max() > 0
    assert np.abs(state.teacher_ema[name] - source_value).max() > 0 and np.abs(state.teacher_ema[name] - adapted).max() > 0
    assert any(np.abs(result.tensors[k] - plain_result.tensors[k]).max() > 0 for k in result.tensors)  # other labels, other delta
    restored = decode_state(encode_state(state), engine.cfg)
    np.testing.assert_array_equal(restored.teacher_ema[name], state.teacher_ema[name])


def test_unknown_distillation_source_is_refused() -> None:
    with pytest.raises(ValueError, match="distil_from"):
        CemaConfig(num_classes=10, distil_from="student")


def test_conv_mode_scales_a_small_steps_rate_with_its_new_uploads() -> None:
    """A step on 8 new uploads moves the student a quarter as far as a full step would when
    new_per_step is 32 (first step: SGD's update is the rate times the gradient); affine-only
    CEMA keeps its fixed rate."""
    from server.norm import learn_conv_weights

    def first_move(learn: str, new_per_step: int) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        student, teacher = tiny_pair()
        student = learn_conv_weights(student) if "conv" in learn else student
        engine = CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=new_per_step, replay_min=8,
                                                         learn=learn, adapt_teacher=False))
        state = engine.new_state()
        delta = engine.step(_images(8, 3), state, batch_statistics=True).tensors
        return {k: state.student_norm[k] - engine._source_student[k] for k in delta}  # the float32 masters

    full, quarter = first_move("norm+conv", 8), first_move("norm+conv", 32)
    assert any(k.endswith(".weight") and v.ndim == 4 for k, v in full.items())  # convolutions moved
    for name in full:
        np.testing.assert_allclose(quarter[name], 0.25 * full[name], rtol=1e-3, atol=1e-7)
    affine_full, affine_same = first_move("norm", 8), first_move("norm", 32)
    for name in affine_full:
        np.testing.assert_allclose(affine_same[name], affine_full[name], rtol=1e-5, atol=1e-8)


def test_student_steps_repeat_the_distillation_step_on_the_same_batch() -> None:
    """`student_steps` SGD steps per cohort step: without momentum and at a small rate, k steps
    move the student k times as far as one (the gradient barely changes between them)."""
    def first_move(steps: int) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        student, teacher = tiny_pair()
        engine = CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=8, replay_min=8, momentum=0.0,
                                                         student_lr=1e-4, student_steps=steps, adapt_teacher=False))
        state = engine.new_state()
        delta = engine.step(_images(8, 5), state, batch_statistics=True).tensors
        return {k: state.student_norm[k] - engine._source_student[k] for k in delta}

    one, two, three = first_move(1), first_move(2), first_move(3)
    assert max(float(np.abs(v).max()) for v in one.values()) > 0  # the step moved the student
    for name in one:
        np.testing.assert_allclose(two[name], 2 * one[name], rtol=1e-2, atol=1e-9)
        np.testing.assert_allclose(three[name], 3 * one[name], rtol=1e-2, atol=1e-9)


def test_auto_student_passes_follow_the_new_uploads() -> None:
    """Unset, `student_steps` is one pass per `new_per_step` new uploads, rounded up: a step on
    40 batch-statistics uploads (a batch-200 device's) trains as two fixed passes do, one on
    13 (a batch-64 device's) as one pass does."""
    def delta(new: int, steps: int | None) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        student, teacher = tiny_pair()
        engine = CemaEngine(student, teacher, CemaConfig(num_classes=10, new_per_step=32, replay_min=8,
                                                         student_steps=steps, adapt_teacher=False))
        return engine.step(_images(new, 5), engine.new_state(), batch_statistics=True).tensors

    assert [student_passes(n, CemaConfig(num_classes=10)) for n in (1, 13, 32, 33, 40, 64, 65)] == [1, 1, 1, 2, 2, 2, 3]
    assert student_passes(40, CemaConfig(num_classes=10, student_steps=1)) == 1
    for new, passes in ((40, 2), (13, 1)):
        auto, fixed, other = delta(new, None), delta(new, passes), delta(new, 3 - passes)
        for name in auto:
            np.testing.assert_array_equal(auto[name], fixed[name])
        assert any(not np.array_equal(auto[name], other[name]) for name in auto)


def test_a_student_whose_full_delta_a_device_could_not_read_is_refused_at_start() -> None:
    from server.main import MAX_DELTA_TENSOR_BYTES, check_delta_size
    from server.models.cifar_resnet import cifar_resnet
    from server.models.imagenet_resnet import ImageNetResNet
    from server.norm import for_the_wire, learn_conv_weights, replaceable_state

    small = learn_conv_weights(cifar_resnet("resnet20"))  # about 0.5 MiB: fine
    check_delta_size(small, "resnet20")
    assert sum(v.nbytes for v in for_the_wire(replaceable_state(small), small).values()) < MAX_DELTA_TENSOR_BYTES
    check_delta_size(ImageNetResNet("resnet18"), "resnet18")  # its affine tensors alone: fine
    with pytest.raises(ValueError, match=r"resnet18 with --learn norm\+conv would carry 21\.\d MiB .* learn fewer"):
        check_delta_size(learn_conv_weights(ImageNetResNet("resnet18")), "resnet18 with --learn norm+conv")
    from server.main import mark_learnt
    from server.norm import conv_weights

    for asked in ("auto", "race"):
        small, big = cifar_resnet("resnet20"), ImageNetResNet("resnet18")
        assert mark_learnt(small, asked) == asked and conv_weights(small)
        assert mark_learnt(big, asked) == "norm" and not conv_weights(big)  # the affine parameters alone
    check_delta_size(big, "resnet18")
    assert mark_learnt(big, "norm+conv") == "norm+conv" and conv_weights(big)  # asked for explicitly: refused above


def test_convolution_rates_turn_filters_of_any_scale_alike() -> None:
    """A convolution followed by batch normalisation computes the same function at any weight
    scale. With rates by the squared norm (`conv_rates`, the cap binding), one cloud step moves
    a student whose convolutions are 3x larger to exactly 3x the weights of the other: the same
    function. One rate for every tensor would turn the small filters 9x further."""
    from server.norm import conv_weights, learn_conv_weights

    engines, images = [], _images(16, 3)
    for scale in (1.0, 3.0):
        student, teacher = tiny_pair()
        with torch.no_grad():
            for w in conv_weights(learn_conv_weights(student)).values():
                w.mul_(scale)
        engines.append(CemaEngine(student, teacher, CemaConfig(num_classes=10, learn="norm+conv", student_lr=50.0, conv_lr=1.0)))
    states = [engine.new_state() for engine in engines]
    for engine, state in zip(engines, states):
        engine.step(images, state, batch_statistics=True)
    small, large = states[0].student_norm, states[1].student_norm
    convs = set(conv_weights(engines[0].student))
    for name in convs:
        moved = np.abs(small[name] - engines[0]._source_student[name]).max()
        assert moved > 1e-3  # the step did turn them
        np.testing.assert_allclose(large[name], 3.0 * small[name], rtol=1e-3, atol=1e-4)
    for name in set(small) - convs:  # the affine parameters took the same step (up to BN's epsilon, at this rate)
        np.testing.assert_allclose(large[name], small[name], rtol=1e-3, atol=2e-4)


def test_convolution_rates_are_the_students_rate_capped_by_the_squared_norm() -> None:
    small, large = torch.nn.Parameter(torch.full((4, 4), 0.5)), torch.nn.Parameter(torch.full((4, 4), 2.0))
    rates = conv_rates([small, large], student_lr=1e-2, conv_lr=1e-3)  # squared norms 4 and 64
    assert rates[small] == pytest.approx(4e-3) and rates[large] == 1e-2


def test_a_stored_optimizer_without_the_convolution_groups_starts_afresh() -> None:
    """A cohort stored before the convolutions had their own rates kept one SGD group: its next
    step starts a new optimizer with a group per convolution instead of failing."""
    from server.norm import learn_conv_weights

    student, teacher = tiny_pair()
    engine = CemaEngine(learn_conv_weights(student), teacher, CemaConfig(num_classes=10, learn="norm+conv"))
    state = engine.new_state()
    engine.step(_images(16), state, batch_statistics=True)
    groups = state.student_opt["param_groups"]
    assert len(groups) == 1 + len(engine._conv_params)
    state.student_opt = torch.optim.SGD([p for p in engine.student.parameters() if p.requires_grad],
                                        lr=1.0, momentum=0.9).state_dict()  # one group, as stored before
    engine.step(_images(16, 1), state, batch_statistics=True)
    assert [len(g["params"]) for g in state.student_opt["param_groups"]] == [len(g["params"]) for g in groups]


def test_auto_learns_the_convolutions_from_batch_statistics_devices_only() -> None:
    """learn="auto", the default: a cohort whose devices normalise by batch statistics gets its
    convolutions learnt and shipped; one whose devices keep running statistics (which lag behind
    a delta that moves the weights) learns the affine parameters alone, its convolutions at their
    source values and off the wire."""
    from server.norm import conv_weights, learn_conv_weights

    student, teacher = tiny_pair()
    engine = CemaEngine(learn_conv_weights(student), teacher, CemaConfig(num_classes=10, learn="auto"))
    convs, source = set(conv_weights(engine.student)), engine._source_student
    for batch_statistics in (True, False):
        state = engine.new_state()
        tensors = engine.step(_images(16), state, batch_statistics=batch_statistics).tensors
        moved = {name for name in convs if not np.array_equal(state.student_norm[name], source[name])}
        assert moved == (convs if batch_statistics else set())
        assert (convs & set(tensors)) == moved
        assert any(np.abs(state.student_norm[k] - source[k]).max() > 0 for k in set(source) - convs)  # affine moved


def test_device_batch_norm_computes_with_the_devices_statistics_and_differentiates_as_train_mode() -> None:
    """Forward: BN under the statistics given (what the device computed). Backward: exactly
    train-mode BN's gradient, so the student learns for a network that renormalises; with the
    batch's own statistics given, the two are the same function."""
    from server.grouped import device_batch_norm

    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    model = torch.nn.Sequential(layer)
    x = torch.randn(5, 3, 4, 4) * 3 + 1
    own = {"0.running_mean": x.mean(dim=(0, 2, 3)), "0.running_var": x.var(dim=(0, 2, 3), unbiased=False)}
    device = {"0.running_mean": torch.tensor([0.0, 1.0, 2.0]), "0.running_var": torch.tensor([1.0, 4.0, 9.0])}

    def forward_and_grads(stats: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        xs = x.clone().requires_grad_(True)
        model.zero_grad()
        model.train()
        if stats is None:
            out = model(xs)
        else:
            with device_batch_norm(model, stats):
                out = model(xs)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [xs.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]

    train_out, train_grads = forward_and_grads(None)
    own_out, own_grads = forward_and_grads(own)
    device_out, device_grads = forward_and_grads(device)
    assert "forward" not in vars(layer)  # the module is itself again
    with torch.no_grad():
        layer.running_mean.copy_(device["0.running_mean"])
        layer.running_var.copy_(device["0.running_var"])
    xs = x.clone().requires_grad_(True)
    model.zero_grad()
    model.eval()
    eval_out = model(xs)
    (eval_out * torch.linspace(-1, 1, eval_out.numel()).view_as(eval_out)).sum().backward()

    torch.testing.assert_close(own_out, train_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(own_grads, train_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(device_out, eval_out.detach())  # what the device computed
    torch.testing.assert_close(device_grads[1], layer.weight.grad)  # the affine gradients under those statistics
    assert not torch.allclose(device_grads[0], xs.grad, atol=1e-3)  # the input's flows through the batch statistics
    assert not torch.allclose(device_grads[1], train_grads[1], atol=1e-3)


def test_a_batch_statistics_upload_is_distilled_under_the_statistics_its_device_sent() -> None:
    """The new group of a batch-statistics device that sent its batch's statistics is normalised
    by those (`device_batch_norm`), not by the few uploaded frames' own: another delta. Stored for
    replay it keeps no statistics (later steps move the weights they were measured under), and
    the deltas carry none either: the device measures its own."""
    engine = _engine()
    images = _images(16)
    names = [k for k in engine._source_student if k.endswith((".running_mean", ".running_var"))]
    sent = {k: (engine._source_student[k] * 2 + 0.5).astype(np.float32) for k in names}
    own = engine.step(images, engine.new_state(), batch_statistics=True).tensors
    state = engine.new_state()
    under_sent = engine.step(images, state, sent, batch_statistics=True).tensors
    assert own.keys() == under_sent.keys() and not set(names) & set(under_sent)
    assert any(not np.allclose(own[k], under_sent[k]) for k in own)
    assert [g.stats for g in state.replay.groups] == [None]
