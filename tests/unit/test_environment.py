"""Environment variables: one MER_ prefix, read in one function, with XDG defaults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mer.environment import read_environment
from mer.errors import ConfigError


def test_defaults_follow_xdg_and_home():
    environment = read_environment({})
    assert environment.cache_dir == Path.home() / ".cache" / "mer"
    assert environment.runtime_base_dir == Path("/tmp")
    assert environment.log_level is None  # unset: each process keeps its default level
    assert environment.unknown_variables == ()


def test_xdg_variables_give_the_defaults():
    environment = read_environment({"XDG_CACHE_HOME": "/var/cache/u", "XDG_RUNTIME_DIR": "/run/user/7"})
    assert environment.cache_dir == Path("/var/cache/u/mer")
    assert environment.runtime_base_dir == Path("/run/user/7")


def test_relative_xdg_paths_are_ignored():
    environment = read_environment({"XDG_CACHE_HOME": "relative", "XDG_RUNTIME_DIR": "also/relative"})
    assert environment.cache_dir == Path.home() / ".cache" / "mer"
    assert environment.runtime_base_dir == Path("/tmp")


def test_mer_variables_win():
    environment = read_environment(
        {
            "MER_CACHE_DIR": "/data/mer",
            "MER_RUNTIME_DIR": "/dev/shm/runs",
            "XDG_RUNTIME_DIR": "/run/user/7",
            "MER_LOG_LEVEL": " DEBUG ",
        }
    )
    assert environment.cache_dir == Path("/data/mer")
    assert environment.runtime_base_dir == Path("/dev/shm/runs")
    assert environment.log_level == "debug"


def test_bad_values_are_config_errors_naming_the_variable():
    with pytest.raises(ConfigError, match=r"MER_LOG_LEVEL='loud' is not one of debug, info"):
        read_environment({"MER_LOG_LEVEL": "loud"})
    with pytest.raises(ConfigError, match=r"MER_CACHE_DIR='cache' must be an absolute path"):
        read_environment({"MER_CACHE_DIR": "cache"})


def test_read_faults_are_expert_and_count_pairs():
    assert read_environment({}).read_faults == ()
    assert read_environment({"MER_READ_FAULTS": "11:2, 3:1,"}).read_faults == ((11, 2), (3, 1))
    for bad in ("11", "11:x", "-1:2", "11:2:3"):
        with pytest.raises(ConfigError, match=rf"MER_READ_FAULTS: entry '{bad}' is not EXPERT_ID:COUNT"):
            read_environment({"MER_READ_FAULTS": bad})


def test_read_hangs_are_expert_and_count_pairs_apart_from_the_faults():
    environment = read_environment({"MER_READ_FAULTS": "hang:11, 3:1, hang:5:2, hang:7:1:2.5"})
    assert environment.read_hangs == ((11, 1, math.inf), (5, 2, math.inf), (7, 1, 2.5))
    assert environment.read_faults == ((3, 1),) and read_environment({}).read_hangs == ()
    for bad in ("hang:", "hang:x", "hang:11:x", "hang:11:2:x", "hang:11:2:-1", "hang:11:2:3:4", "hung:11", "3:1:2"):
        with pytest.raises(ConfigError, match=rf"MER_READ_FAULTS: entry '{bad}' is not EXPERT_ID:COUNT nor hang:"):
            read_environment({"MER_READ_FAULTS": bad})


def test_work_faults_are_parsed_and_a_bad_entry_is_named():
    assert read_environment({}).work_faults is None
    faults = read_environment({"MER_WORK_FAULTS": "spin:1:3, slow:0.25"}).work_faults
    assert (faults.spin, faults.slow_item_s) == (("1", 3), 0.25)
    assert faults.spins_in("1", 3, 0) and not faults.spins_in("1", 3, 1) and not faults.spins_in("0", 3, 0)
    assert read_environment({"MER_WORK_FAULTS": "spin:io:40"}).work_faults.spin == ("io", 40)
    faults = read_environment({"MER_WORK_FAULTS": "spin:predictor:9,slow_row:0.02"}).work_faults
    assert (faults.spin, faults.slow_item_s, faults.slow_row_s) == (("predictor", 9), 0.0, 0.02)
    assert faults.spins_in("predictor", 9, 0) and not faults.spins_in("predictor", 9, 1)
    for bad in ("spin:1", "spin:1:0", "spin:x:2", "spin:router:2", "slow:-1", "slow:nan", "slow:inf", "freeze:1",
                "slow_row:-0.5", "slow_row:x", "spin:predictor"):
        with pytest.raises(ConfigError, match=rf"MER_WORK_FAULTS: entry '{bad}' is neither spin:WORKER:JOB"):
            read_environment({"MER_WORK_FAULTS": bad})


def test_unknown_mer_variables_are_reported():
    environment = read_environment({"MER_CACHE_DIRR": "/x", "MER_LOG_LEVEL": "info", "OTHER": "1"})
    assert environment.unknown_variables == ("MER_CACHE_DIRR",)


def test_the_cli_warns_about_unknown_mer_variables(tmp_path, monkeypatch, capsys):
    from mer.cli.main import main

    monkeypatch.setenv("MER_CACHE_DIRR", "/x")
    assert main(["run", "--store", str(tmp_path / "absent")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("mer-pipeline: warning: unknown environment variable MER_CACHE_DIRR "
                        "(mer reads MER_CACHE_DIR, MER_RUNTIME_DIR, MER_LOG_LEVEL, MER_READ_FAULTS, MER_WORK_FAULTS)")
    assert lines[1].startswith("mer-pipeline run: error:")
