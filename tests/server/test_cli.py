"""The `fwserve` command line: settings from flags and environment, dispatch."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from server import cli
from server.config import Settings


def test_serve_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out, name
        assert "FWSERVE_" + name.upper() in out, name
    for flag in ("--host", "--port", "--backbone", "--weights", "--device", "--random-init",
                 "--max-batch-size", "--max-wait-ms", "--max-device-sessions", "--max-host-sessions"):
        assert flag in out


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("FWSERVE_PORT", "9001")
    monkeypatch.setenv("FWSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FWSERVE_RANDOM_INIT", "true")
    s = cli.settings_from_args(["--port", "9002", "--backbone", "vit_small_patch16_224", "--max-wait-ms", "0.5"])
    assert s.port == 9002 and s.max_batch_size == 7 and s.random_init is True
    assert s.backbone == "vit_small_patch16_224" and s.max_wait_ms == 0.5
    s = cli.settings_from_args(["--no-random-init", "--weights", "w.safetensors"])
    assert s.random_init is False and s.weights == Path("w.safetensors")


def test_invalid_settings_exit_2(capsys, monkeypatch):
    assert cli.main(["serve", "--max-batch-size", "0"]) == 2
    assert cli.main(["serve", "--random-init", "--weights", "x.pth"]) == 2
    assert cli.main(["serve", "--backbone", "nope"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert cli.main(["serve", "--weights", "/does/not/exist.safetensors"]) == 2
    assert cli.main(["bogus"]) == 2


def test_train_backbone_dispatches_to_models_train(monkeypatch):
    seen = {}
    fake = types.ModuleType("models.train")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    import models

    monkeypatch.setitem(sys.modules, "models.train", fake)
    monkeypatch.setattr(models, "train", fake, raising=False)
    assert cli.main(["train-backbone", "--epochs", "1", "--out", "x"]) == 0
    assert seen["argv"] == ["--epochs", "1", "--out", "x"]


def test_usage(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
