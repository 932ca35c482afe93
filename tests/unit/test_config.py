"""Configuration: shipped presets, strict keys and bounds, flag precedence, round trips, machine checks."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from pathlib import Path

import msgspec
import pytest

from mer.cli.pipeline_flags import add_config_flags
from mer.config import (
    CONFIG_DIR,
    PREDICTOR_NAMES,
    SETTINGS,
    PipelineConfig,
    available_core_count,
    config_overrides,
    flag_name,
    load_config,
    read_config_file,
    resolve_for_machine,
    shipped_config_path,
    validate_against_geometry,
)
from mer.errors import ConfigError
from mer.store.manifest import Geometry

SHIPPED = ("default", "mixtral-8x7b-bench", "tiny")


def write_config(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_geometry(experts_per_layer: int = 8, num_moe_layers: int = 2) -> Geometry:
    return Geometry("mixtral", num_moe_layers, num_moe_layers, experts_per_layer, 2, 256, 512)


# --- shipped presets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_with_the_values_it_sets(name):
    path = shipped_config_path(name)
    raw = tomllib.loads(path.read_text())
    config = load_config(path, available_cores=4)
    assert raw, "a preset sets at least one key"
    for key, value in raw.items():
        expected = 4 // config.kernel_threads if (key, value) == ("compute_workers", "auto") else value
        if key == "predictors":
            expected = tuple(value.split(","))  # parsed once, into the names
        assert getattr(config, key) == expected, key
    assert config.store is None  # `up` and the benchmark tool fill in the store


def test_benchmark_preset_matches_the_issue():
    config = load_config(shipped_config_path("mixtral-8x7b-bench"), available_cores=4)
    assert (config.cache_slots, config.workload, config.tokens, config.top_k) == (64, "markov", 300, 2)
    assert not config.layered


def test_default_preset_documents_every_key():
    text = (CONFIG_DIR / "default.toml").read_text()
    missing = [key for key in SETTINGS if f"{key} =" not in text]
    assert missing == []


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match=r"no shipped config 'huge'.*default, mixtral-8x7b-bench, tiny"):
        shipped_config_path("huge")


def test_every_field_has_documentation_and_valid_default():
    for key, setting in SETTINGS.items():
        assert setting.doc.endswith("."), key
        assert setting.metavar or setting.wanted == "a boolean", key  # every flag shows what it takes
    assert PipelineConfig() == PipelineConfig.from_dict(PipelineConfig().to_dict())


# --- strictness ---------------------------------------------------------------------------------------


def test_unknown_key_names_the_key_and_file_and_suggests(tmp_path):
    path = write_config(tmp_path, "cache_slot = 8\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'cache_slot' \(did you mean 'cache_slots'\?\)"):
        load_config(path)


def test_unknown_key_without_a_close_match_lists_known_keys(tmp_path):
    path = write_config(tmp_path, "[io]\nbackend = 'uring'\n")
    with pytest.raises(ConfigError, match=r"unknown key 'io' \(known keys: store, tokens, cache_slots"):
        load_config(path)


@pytest.mark.parametrize(
    ("line", "message_pattern"),
    [
        ('cache_slots = "64"', r"cache_slots must be an integer, got str '64'"),
        ("cache_slots = 6.0", r"cache_slots must be an integer, got float 6\.0"),
        ("tokens = true", r"tokens must be an integer, got bool True"),
        ("prefetch = 1", r"prefetch must be a boolean, got int 1"),
        ("zipf_s = 'steep'", r"zipf_s must be a number, got str 'steep'"),
        ("workload = 3", r"workload must be a string, got int 3"),
        ("compute_workers = 'many'", r"compute_workers must be an integer or 'auto', got str 'many'"),
        ("store = 5", r"store must be a path, got int 5"),
        ("seed = [1, 2]", r"seed must be an integer, got list \[1, 2\]"),
    ],
)
def test_wrong_type_names_file_key_and_value(tmp_path, line, message_pattern):
    path = write_config(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: {message_pattern}"):
        load_config(path)


@pytest.mark.parametrize(
    ("line", "message_pattern"),
    [
        ("cache_slots = 0", r"cache_slots = 0 is out of range; allowed 1\.\.1000000"),
        ("workload_correlation = 1.5", r"workload_correlation = 1\.5 is out of range; allowed 0\.0\.\.1\.0"),
        ("zipf_s = -0.5", r"zipf_s = -0\.5 is out of range; allowed 0\.0\.\.10\.0"),
        ("compute_workers = 0", r"compute_workers = 0 is out of range; allowed 1\.\.1024"),
        ("io_queue_depth = 5000", r"io_queue_depth = 5000 is out of range; allowed 1\.\.4096"),
        ("handshake_timeout_s = 0", r"handshake_timeout_s = 0\.0 is out of range; allowed 0\.1\.\.3600\.0"),
        ("workload = 'zipf'", r"workload = 'zipf' is not one of: markov, uniform, skewed, replay"),
        ("io_backend = 'aio'", r"io_backend = 'aio' is not one of: auto, uring, preadv"),
    ],
)
def test_out_of_range_names_key_value_and_range(tmp_path, line, message_pattern):
    path = write_config(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: {message_pattern}"):
        load_config(path)


def test_bounds_hold_for_direct_construction_too():
    with pytest.raises(ConfigError, match=r"top_k = 0 is out of range"):
        PipelineConfig(top_k=0)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path):
    path = write_config(tmp_path, "tokens = = 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_residuals_are_recorded_into_a_trace_and_a_gate_model_needs_the_gate(tmp_path):
    with pytest.raises(ConfigError, match=r"record_hidden records residuals .* set record_trace"):
        load_config(write_config(tmp_path, "record_hidden = true\n"))
    assert load_config(write_config(tmp_path, "record_hidden = true\nrecord_trace = 't.jsonl'\n")).record_hidden
    with pytest.raises(ConfigError, match=r"gate_model .*model\.gguf is set but predictors 'markov' has no gate"):
        load_config(write_config(tmp_path, "gate_model = 'model.gguf'\n"))


def test_a_gate_model_is_for_a_layered_replay(tmp_path):
    trace = "trace = 't.jsonl'\nworkload = 'replay'\npredictors = 'gate'\ngate_model = 'model.gguf'\n"
    with pytest.raises(ConfigError, match=r"use --workload replay --trace FILE --layered, not workload 'replay' "
                                          r"without --layered"):
        load_config(write_config(tmp_path, trace))
    config = load_config(write_config(tmp_path, trace + "layered = true\n"))
    assert (config.gate_model, config.predictors) == (tmp_path / "model.gguf", ("gate",))


def test_predictors_are_parsed_once_into_names_in_canonical_order(tmp_path):
    assert PREDICTOR_NAMES == ("markov", "locality", "affinity", "gate")
    assert PipelineConfig(predictors="affinity, markov").predictors == ("markov", "affinity")
    assert PipelineConfig(predictors="gate,markov").predictors == ("markov", "gate")
    assert load_config(write_config(tmp_path, "predictors = ['locality', 'markov']\n")).predictors == (
        "markov", "locality")
    for bad, message in (("bogus", "unknown predictor 'bogus'"), ("markov,markov", "names a predictor twice"),
                         ("", "unknown predictor ''")):
        with pytest.raises(ConfigError, match=message):
            PipelineConfig(predictors=bad)
    with pytest.raises(ConfigError, match=r"predictors must be a comma-separated string or a list of names, got int 3"):
        PipelineConfig(predictors=3)


def test_replay_needs_a_trace_and_a_trace_needs_replay(tmp_path):
    with pytest.raises(ConfigError, match=r"workload 'replay' needs a trace file: set trace \(--trace FILE\)"):
        load_config(write_config(tmp_path, "workload = 'replay'\n"))
    with pytest.raises(ConfigError, match=r"trace .*routing\.jsonl is set but workload is 'markov'"):
        load_config(write_config(tmp_path, "trace = 'routing.jsonl'\n"))


# --- precedence and paths ----------------------------------------------------------------------------


def test_flags_override_file_which_overrides_defaults(tmp_path):
    path = write_config(tmp_path, "tokens = 50\ncache_slots = 12\nprefetch = true\n")
    config = load_config(path, {"cache_slots": 20, "tokens": None, "prefetch": False}, available_cores=2)
    assert config.cache_slots == 20  # flag beats file
    assert config.tokens == 50  # a None flag leaves the file's value
    assert config.prefetch is False
    assert config.top_k == SETTINGS["top_k"].default == 2  # neither sets it


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'cache_slot'"):
        load_config(overrides={"cache_slot": 3})


def test_override_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"command-line flag --cache-slots: cache_slots = -1 is out of range"):
        load_config(overrides={"cache_slots": -1})
    with pytest.raises(ConfigError, match=r"command-line flag --no-prefetch: prefetch must be a boolean"):
        load_config(overrides={"prefetch": "no"})


def test_overrides_from_the_flag_builder(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    parser.add_argument("--json", action="store_true")
    path = write_config(tmp_path, "cache_slots = 12\ncompute_workers = 1\n")
    arguments = parser.parse_args(["--compute-workers", "2", "--no-prefetch", "--json", "--predictors", "gate,markov"])
    overrides = config_overrides(arguments)
    assert overrides == {"compute_workers": 2, "prefetch": False, "predictors": "gate,markov"}
    config = load_config(path, overrides, available_cores=2)
    assert (config.cache_slots, config.compute_workers, config.prefetch) == (12, 2, False)
    assert config.predictors == ("markov", "gate")
    assert config_overrides(parser.parse_args([])) == {}
    assert parser.parse_args(["--compute-workers", "auto"]).compute_workers == "auto"


def test_flags_of_a_job_leave_out_the_other_jobs_settings():
    generate, run = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_config_flags(generate, job="generation")
    add_config_flags(run, job="benchmark")
    generate_flags = {action.dest for action in generate._actions}
    run_flags = {action.dest for action in run._actions}
    assert {"seed", "top_k", "tokens", "workload", "store"}.isdisjoint(generate_flags)  # the sampler's, the model's
    assert "record_hidden" in generate_flags and "record_hidden" not in run_flags
    assert run_flags | generate_flags >= set(SETTINGS)


def test_paths_are_relative_to_the_file_or_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    path = write_config(folder, "store = 'stores/tiny'\nworkload = 'replay'\ntrace = '../t.jsonl'\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(path, {"log_file": "logs/run.jsonl"}, available_cores=1)
    assert config.store == folder / "stores/tiny"
    assert config.trace == folder / "../t.jsonl"
    assert config.log_file == tmp_path / "logs/run.jsonl"
    assert read_config_file(path)["store"] == folder / "stores/tiny"


def test_flag_names():
    assert flag_name("cache_slots") == "--cache-slots"
    assert flag_name("prefetch") == "--no-prefetch"
    assert flag_name("layered") == "--layered"


# --- serialisation -----------------------------------------------------------------------------------


def test_round_trip_through_json(tmp_path):
    trace = tmp_path / "t.jsonl"
    config = load_config(
        overrides={"store": str(tmp_path), "workload": "replay", "trace": str(trace), "zipf_s": 2, "layered": True},
        available_cores=2,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["store"] == str(tmp_path) and data["zipf_s"] == 2.0 and data["compute_workers"] == 2
    assert PipelineConfig.from_dict(data) == config
    assert set(data) == set(SETTINGS)


def test_from_dict_is_strict():
    data = PipelineConfig().to_dict() | {"cache_slot": 3}
    with pytest.raises(ConfigError, match=r"child config: unknown key 'cache_slot'"):
        PipelineConfig.from_dict(data, source="child config")


# --- the machine and the store -----------------------------------------------------------------------


def test_auto_workers_use_the_affinity_mask():
    config = load_config()
    assert config.compute_workers == len(os.sched_getaffinity(0)) == available_core_count()
    assert config.num_compute_workers == config.compute_workers


def test_auto_workers_divide_cores_by_kernel_threads():
    assert load_config(overrides={"kernel_threads": 2}, available_cores=8).compute_workers == 4
    assert load_config(overrides={"kernel_threads": 3}, available_cores=8).compute_workers == 2
    assert load_config(overrides={"kernel_threads": 4}, available_cores=4).compute_workers == 1


def test_unresolved_auto_is_refused_where_a_count_is_needed():
    with pytest.raises(ConfigError, match="still 'auto'"):
        PipelineConfig().num_compute_workers


def test_too_many_threads_for_the_cores():
    with pytest.raises(ConfigError, match=r"compute_workers 3 x kernel_threads 2 = 6 threads, more than the 4 "):
        load_config(overrides={"compute_workers": 3, "kernel_threads": 2}, available_cores=4)
    with pytest.raises(ConfigError, match=r"kernel_threads 8 is more than the 4 available cores"):
        load_config(overrides={"kernel_threads": 8}, available_cores=4)
    fits = load_config(overrides={"compute_workers": 2, "kernel_threads": 2}, available_cores=4)
    assert fits.compute_workers * fits.kernel_threads == 4


def test_resolve_keeps_an_explicit_count():
    config = PipelineConfig(compute_workers=1)
    assert resolve_for_machine(config, available_cores=16) == config


def test_cache_slots_below_top_k_names_both():
    config = PipelineConfig(cache_slots=3, top_k=4)
    with pytest.raises(ConfigError, match=r"cache_slots 3 is below top_k 4.*--cache-slots 4 or more"):
        validate_against_geometry(config, tiny_geometry())


def test_geometry_accepts_k_slots_and_more_slots_than_experts():
    geometry = tiny_geometry()
    validate_against_geometry(PipelineConfig(cache_slots=2, top_k=2), geometry)
    validate_against_geometry(PipelineConfig(cache_slots=geometry.num_experts * 4, top_k=2), geometry)


def test_top_k_must_fit_the_pool():
    geometry = tiny_geometry(experts_per_layer=4, num_moe_layers=3)
    flat = PipelineConfig(cache_slots=12, top_k=12)
    validate_against_geometry(flat, geometry)  # the flat pool has 12 experts
    with pytest.raises(ConfigError, match=r"top_k 12 is more than the store's 4 experts per layer"):
        validate_against_geometry(msgspec.structs.replace(flat, layered=True), geometry)
    with pytest.raises(ConfigError, match=r"top_k 13 is more than the store's 12 experts in the flat pool"):
        validate_against_geometry(PipelineConfig(cache_slots=13, top_k=13), geometry)
