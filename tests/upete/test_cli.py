import subprocess
import sys
from pathlib import Path

import pytest

from upete.cli import COMMANDS, build_parser, main


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for name in COMMANDS:
        with pytest.raises(SystemExit) as info:
            main([name.replace("_", "-"), "--help"])
        assert info.value.code == 0
        assert "usage: upete" in capsys.readouterr().out


def test_top_level_help_lists_commands() -> None:
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name.replace("_", "-") in text


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 0
    assert "ok: AE UPETE on 127.0.0.1:11112" in capsys.readouterr().out


def test_check_config_names_the_misspelt_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("node:\n  ae_title: UPETE\n  prot: 104\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert f"{path}: node.prot: unknown key" in capsys.readouterr().err


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text("node:\n  port: 99999\n")
    proc = subprocess.run([sys.executable, "-m", "upete", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and "node.port" in proc.stderr


def _train_args(*extra: str):  # noqa: ANN202 - argparse.Namespace
    return build_parser().parse_args(["train", "--variant", "ldm-p", "--data", "d", "--out", "o", *extra])


def test_train_options_not_given_take_the_settings_tables_defaults() -> None:
    from model.training.settings import TrainSettings, TrainStage
    from upete.commands.train import train_settings

    settings = train_settings(_train_args())
    table = TrainSettings(variant=settings.variant, data_dir=Path("d"), out_dir=Path("o"))
    assert settings == table and settings.stage is TrainStage.BOTH


def test_train_options_given_override_the_table() -> None:
    from upete.commands.train import train_settings

    settings = train_settings(_train_args("--steps", "7", "--denoiser-steps", "9", "--batch", "3",
                                          "--no-amp", "--stage", "ae", "--patch", "16,32,32"))
    assert (settings.ae_steps, settings.denoiser_steps, settings.batch_size) == (7, 9, 3)
    assert settings.amp is False and settings.stage.value == "ae" and settings.patch_size == (16, 32, 32)
