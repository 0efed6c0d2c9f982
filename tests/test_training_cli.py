"""``deltapack train``: the embedded run, local models and data, LoRA, saving, and clear errors for bad paths."""

from __future__ import annotations

import json
import logging
import math

import pytest

from deltapack.cli import main
from deltapack.data.demo import char_tokenizer
from deltapack.tiny import tiny_model

pytest.importorskip("peft")
logging.getLogger("transformers").setLevel(logging.ERROR)

FAST = ["--steps", "2", "--max-tokens", "600", "--batch-rows", "2"]


def run_json(capsys, *argv: str) -> dict:
    assert main(["train", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_embedded_run_reports_loss_tokens_and_padding(capsys) -> None:
    report = run_json(capsys, *FAST)
    assert report["steps"] == 2 and report["documents"] == 512
    assert report["fill"] > 0.9
    assert 0 < report["tokens"] <= report["packed_tokens_computed"] < report["padded_tokens_computed"]
    assert math.isfinite(report["first_loss"]) and math.isfinite(report["last_loss"])
    assert report["device"] == "cpu"


def test_local_config_data_file_lora_and_output(tmp_path, capsys) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "model"
    tiny_model("qwen3_5").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    lines = [{"text": "packed rows keep documents apart"}, {"prompt": "Q: 2 + 2 = ?\nA: ", "completion": "4"}]
    lines += [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}] * 3
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    report = run_json(capsys, "--model", str(model_dir), "--data", str(data), "--lora", "--output", str(out), *FAST)
    assert report["documents"] == 5 and "weights" in report["model"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(PeftModel.from_pretrained(base, out, local_files_only=True), PeftModel)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)("ab")["input_ids"] == [70, 71]


def test_config_only_directory_trains_a_random_init_model(tmp_path, capsys) -> None:
    model_dir = tmp_path / "config"
    tiny_model("qwen3_5_moe").config.save_pretrained(model_dir)
    report = run_json(capsys, "--model", str(model_dir), *FAST)
    assert "config only" in report["model"] and report["steps"] == 2


@pytest.mark.parametrize("option", ["--model", "--data", "--tokenizer"])
def test_missing_local_path_is_a_clear_error(option: str, tmp_path, capsys) -> None:
    missing = str(tmp_path / "nowhere")
    assert main(["train", option, missing, *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{option} {missing!r} does not exist" in err and "nothing is downloaded" in err


def test_bad_data_line_names_the_line(tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"question": "no known field"}\n')
    assert main(["train", "--data", str(data), *FAST]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "llama"], "--arch 'llama' has no embedded tiny model; expected one of"),
        (["--steps", "0"], "--steps 0; expected at least 1"),
        (["--max-tokens", "0"], "--max-tokens 0; expected at least 1"),
        (["--epochs", "0"], "--epochs 0.0; expected a positive number"),
    ],
)
def test_unusable_options_exit_2_before_training(argv: list[str], message: str, capsys) -> None:
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and captured.out == ""
