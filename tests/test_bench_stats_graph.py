"""scripts/bench_stats_graph.py's reference, the statistics built from explicit nodes, gives the
logits and statistics of the shipped graph (training-mode BatchNorm) on the embedded student."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np

from device_client.runtime import split_norm_file
from device_client.statistics import StatisticsProbe
from server.export import export_student
from server.models.registry import build_model, model_info
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stats_graph", REPO / "scripts" / "bench_stats_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kernel_statistics_graph_equals_the_explicit_one_and_the_bench_prints_its_table(capsys):
    bench = _bench()
    info = model_info("embedded-student")
    artifact = export_student(build_model("embedded-student").eval(), info.input_shape)
    params = split_norm_file(artifact.norm, artifact.parameters)
    x = np.random.default_rng(1).random((24, *info.input_shape), dtype=np.float32) * 3 - 1  # not the source's scale
    logits, stats = StatisticsProbe(artifact.stats_onnx).run(x, params)
    ref_logits, ref_stats = StatisticsProbe(bench.explicit_statistics_graph(artifact.stats_onnx)).run(x, params)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    assert set(stats) == set(ref_stats) and len(stats) == 2 * sum(1 for k in artifact.parameters if k.endswith(".running_mean"))
    for name in stats:
        np.testing.assert_allclose(stats[name], ref_stats[name], rtol=1e-4, atol=1e-5)
    argv, sys.argv = sys.argv, ["bench_stats_graph.py", "--batches", "4", "--rounds", "1", "--seconds", "0.05"]
    try:
        bench.main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 4 |"))
    assert row.count("x)") == 2, out
