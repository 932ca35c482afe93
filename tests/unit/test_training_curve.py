"""tools/training_curve.py: the parser of tools/train_tiny_moe.py's log and the PNG it draws.

A synthetic log in the tool's format (the `data:` and `model:` lines, step lines every 25 steps, eval
lines with the unigram baseline) including a resumed run that prints steps 50..75 again: the values
read, the last printed value of a repeated step kept, the planned steps and the baseline; a line that
starts like a step line but does not parse is an error naming the file and line; the PNG is a real PNG
of the plot's size; without matplotlib the error says what is missing."""

from __future__ import annotations

import sys
import zlib

import pytest

from tools.training_curve import TrainingLogError, main, parse_training_log, plot_training_curve, read_training_log

LOG = """\
data: 1690 training files (30,017,042 tokens), 100 held out (1,511,878 tokens); unigram held-out 4.745 bits/byte
model: 20,006,144 parameters, TinyMoEConfig(vocab_size=260, d_model=256, n_layers=6)
step 25/100 train 5.904 bits/byte, balance 1.194, busiest expert share 0.46 0.22 0.25 0.28 0.30 0.38, 43 s
step 50/100 train 3.902 bits/byte, balance 1.187, busiest expert share 0.46 0.20 0.20 0.19 0.26 0.22, 90 s
eval step 50: held-out 3.500 bits/byte (unigram 4.745)
step 75/100 train 3.100 bits/byte, balance 1.100, busiest expert share 0.30 0.20 0.20 0.19 0.26 0.22, 130 s
resuming from build/tiny-moe.pt at step 50
step 75/100 train 3.000 bits/byte, balance 1.100, busiest expert share 0.30 0.20 0.20 0.19 0.26 0.22, 40 s
step 100/100 train 2.500 bits/byte, balance 1.050, busiest expert share 0.20 0.20 0.20 0.19 0.21 0.22, 80 s
eval step 100: held-out 2.750 bits/byte (unigram 4.745)
"""


def test_the_log_s_steps_are_read_and_a_resumed_step_keeps_its_last_value():
    curve = parse_training_log(LOG)
    assert curve.train == {25: 5.904, 50: 3.902, 75: 3.000, 100: 2.5}
    assert curve.held_out == {50: 3.5, 100: 2.75}
    assert (curve.total_steps, curve.unigram) == (100, 4.745)
    assert curve.to_json_dict()["held_out"] == [(50, 3.5), (100, 2.75)]


@pytest.mark.parametrize("line, kind", [("step 25/100 train nothing bits/byte", "step"),
                                        ("eval step 50: held-out ? bits/byte", "eval")])
def test_a_step_line_that_does_not_parse_names_its_line(tmp_path, line, kind):
    path = tmp_path / "train.log"
    path.write_text(LOG.replace("step 75/100 train 3.100", line.split(" bits")[0]) if kind == "step"
                    else LOG + line + "\n")
    number = 6 if kind == "step" else LOG.count("\n") + 1
    with pytest.raises(TrainingLogError, match=rf"{path}, line {number}: not an? {kind} line"):
        read_training_log(path)


def test_the_unigram_baseline_comes_from_the_data_line_before_any_eval():
    curve = parse_training_log("\n".join(LOG.splitlines()[:4]))
    assert (curve.unigram, curve.held_out, curve.train) == (4.745, {}, {25: 5.904, 50: 3.902})


def test_a_log_without_steps_or_unreadable_is_an_error(tmp_path):
    with pytest.raises(TrainingLogError, match="no 'step N/M train"):
        parse_training_log("data: nothing yet\n", "empty.log")
    with pytest.raises(TrainingLogError, match="missing.log: cannot read"):
        read_training_log(tmp_path / "missing.log")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR" and zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_plot_is_a_png_of_the_figure_s_size(tmp_path, capsys):
    log = tmp_path / "train.log"
    log.write_text(LOG)
    png = tmp_path / "docs" / "curve.png"
    main([str(log), "--png", str(png)])
    assert png_size(png.read_bytes()) == (7 * 120, int(4.2 * 120))
    assert "4 training points, 2 held-out points, last held-out 2.750 bits/byte at step 100" in capsys.readouterr().out


def test_without_matplotlib_the_error_says_so(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(SystemExit, match="needs matplotlib"):
        plot_training_curve(parse_training_log(LOG), tmp_path / "curve.png")
    assert not (tmp_path / "curve.png").exists()
