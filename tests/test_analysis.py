"""fewshifts analyze / prune: SSL Tab. 2, Fig. 5, Tab. 3 and ASL Fig. 3 on a saved model file."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fewshifts.analysis import (
    prune_table,
    rank_shift_layers,
    remove_shift_layers_,
    shift_report,
)
from fewshifts.analysis.cli import run_analyze, run_prune
from fewshifts.cli import main
from fewshifts.deploy.synthetic import random_shift_pattern_
from fewshifts.layers import shift_layers
from fewshifts.models import create_model, save_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(sparsities=(1.0, 0.5, 0.9, 0.75, 1.0, 0.25, 0.95, 0.6, 0.8)):
    torch.manual_seed(0)
    model = create_model("shiftresnet20", num_classes=10, in_chans=1, shift="sparse")
    random_shift_pattern_(model, unshifted=0.0)
    for (_, layer), s in zip(shift_layers(model), sparsities):
        layer.shifts.data[: round(s * layer.channels)] = 0.1  # rounds to (0, 0)
    return model.eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return save_model(_model(), tmp_path_factory.mktemp("run") / "model.safetensors", extra=dict(dataset="x"))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_counts_match_layers():
    model = _model()
    report = shift_report(model)
    assert [s.unshifted for s in report.layers] == [m.unshifted() for _, m in shift_layers(model)]
    assert report.layers[0].sparsity == 1.0 and report.layers[0].displacements == {"0,0": 96}
    assert report.channels == 1728  # SSL Tab. 2 total for ShiftResNet-20
    assert sum(sum(s.displacements.values()) for s in report.layers) == report.channels
    table = report.to_markdown()
    assert "| **total** |" in table and f"{report.unshifted} / 1728" in table


def test_analyze_writes_tables_and_plots(model_file, tmp_path, capsys):
    assert main(["analyze", str(model_file), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "shifts.json").read_text())
    assert len(data["layers"]) == 9 and data["channels"] == 1728
    assert "unshifted / channels" in (tmp_path / "shifts.md").read_text()
    for name in ("displacements.png", "real_shifts.png"):
        width, height = _png_size(tmp_path / name)
        assert width > 200 and height > 200
    assert "stages.0.0.shift" in capsys.readouterr().out


def test_rank_and_remove():
    model = _model()
    ranking = rank_shift_layers(model)
    sparsity = {n: m.sparsity() for n, m in shift_layers(model)}
    assert [sparsity[n] for n in ranking] == sorted(sparsity.values(), reverse=True)
    removed = remove_shift_layers_(model, 3)
    assert removed == ranking[:3]
    assert all(dict(shift_layers(model))[n].sparsity() == 1.0 for n in removed)


def test_prune_table_k_0_to_all():
    model = _model()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
    rows = prune_table(model, evaluate=lambda m: float((m(x) - reference).abs().max()))
    assert [r["k"] for r in rows] == list(range(10))
    assert rows[0]["metric"] == 0.0 and rows[-1]["sparsity"] == 1.0
    assert [r["sparsity"] for r in rows] == sorted(r["sparsity"] for r in rows)
    assert shift_layers(model)[1][1].sparsity() == 0.5, "prune_table must not modify the model"


def test_prune_cli_table_and_save(model_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", str(model_file), "--no-eval", "--out", str(out)]) == 0
    rows = json.loads((out / "prune.json").read_text())
    assert len(rows) == 10
    saved = tmp_path / "pruned.safetensors"
    assert main(["prune", str(model_file), "--remove", "4", "--no-eval", "--save", str(saved), "--out", str(out)]) == 0
    assert len(json.loads((out / "prune.json").read_text())) == 10  # the full table is kept
    assert [r["k"] for r in json.loads((out / "prune-remove-4.json").read_text())] == [4]
    from fewshifts.models import load_model

    assert sum(m.sparsity() == 1.0 for _, m in shift_layers(load_model(saved))) == 4  # the 2 all-zero layers rank first
    from fewshifts.models.io import read_model_file

    assert read_model_file(saved)[2] == {"dataset": "x", "pruned_shift_layers": 4}  # eval finds the dataset


def test_prune_with_evaluator(model_file, monkeypatch, tmp_path):
    import fewshifts.analysis.cli as cli

    monkeypatch.setattr(cli, "dataset_evaluator", lambda *a, **k: (lambda m: 0.5))
    assert main(["prune", str(model_file), "--remove", "1", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "prune-remove-1.json").read_text())[0]["metric"] == 0.5


def test_bad_inputs(model_file, tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(["prune", str(model_file), "--remove", "10", "--no-eval"]) == 2
    assert "has 9 shift layers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only 9"):
        remove_shift_layers_(_model(), 10)
    # a file whose weights belong to another architecture than its metadata says
    other = create_model("resnet20", num_classes=10, in_chans=1)
    other.model_spec = _model().model_spec
    bad = save_model(other, tmp_path / "other.safetensors")
    assert main(["analyze", str(bad)]) == 2
    assert "do not fit shiftresnet20" in capsys.readouterr().err
    # a model without shift layers
    plain = save_model(create_model("resnet20", num_classes=10), tmp_path / "plain.safetensors")
    assert main(["analyze", str(plain)]) == 2 and "no shift layers" in capsys.readouterr().err
    assert main(["prune", str(plain), "--no-eval"]) == 2 and "no shift layers" in capsys.readouterr().err
    # not a safetensors file
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    assert main(["analyze", str(junk)]) == 2 and "not a readable safetensors" in capsys.readouterr().err


def test_prune_option_errors(model_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(model_file), "--limit", "0", "--remove", "1"])
    assert exit_.value.code == 2 and "--limit: should be a positive integer instead of '0'" in capsys.readouterr().err
    saved = tmp_path / "pruned.safetensors"
    assert main(["prune", str(model_file), "--no-eval", "--save", str(saved), "--out", str(tmp_path)]) == 2
    assert "pass --remove K" in capsys.readouterr().err and not saved.exists()


def test_run_functions_exist():
    assert callable(run_analyze) and callable(run_prune)
