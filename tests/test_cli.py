"""CLI: every option documented, errors that name the bad file, train -> eval -> predict."""
import argparse
import json
from dataclasses import fields

import pytest

from rtmdet import data as D
from rtmdet.cli import build_parser, main
from rtmdet.train import TrainConfig


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_lists_every_option(capsys):
    parser = build_parser()
    subs = _subparsers(parser)
    assert set(subs) == {"train", "eval", "predict", "bench", "info"}
    for name, sub in subs.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in text, f"{name} --help does not list {opt}"
            if action.option_strings and action.help is not None:
                assert action.help, f"{name} {action.option_strings} has no help"
    # every training setting is reachable from the command line
    train_opts = {o for a in subs["train"]._actions for o in a.option_strings}
    internal = {"progress", "eval_score_thr", "eval_nms_pre", "stage2_ratio_range", "ratio_range",
                "ema_momentum", "ema_gamma", "synthetic", "synthetic_size"}   # preset-only
    for f in fields(TrainConfig):
        if f.name not in internal:
            assert "--" + f.name.replace("_", "-") in train_opts, f.name
    for opt in ("--model", "--data", "--epochs", "--batch-size", "--img-size", "--out", "--resume",
                "--amp", "--device", "--workers", "--lr", "--eval-interval", "--seed", "--max-images",
                "--num-train-images", "--preset"):
        assert opt in train_opts


def test_missing_dataset_path_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_dataset"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_corrupt_annotation_is_named(tmp_path, capsys):
    D.write_synthetic_split(tmp_path / "ds", "train", 2, size=48)
    D.write_synthetic_split(tmp_path / "ds", "val", 1, size=48)
    bad = tmp_path / "ds/annotations/instances_val.json"
    bad.write_text('{"images": [')
    assert main(["train", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "corrupt" in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    D.write_synthetic_split(root / "ds", "train", 2, seed=4, size=64)
    D.write_synthetic_split(root / "ds", "val", 2, seed=4, size=64)
    rc = main(["train", "--model", "tiny", "--data", str(root / "ds"), "--epochs", "1", "--batch-size", "2",
               "--img-size", "64", "--workers", "0", "--eval-interval", "1", "--out", str(root / "run"),
               "--save-predictions", "1", "--backend", "torch", "--no-progress", "--threads", "2"])
    assert rc == 0
    return root


def test_train_eval_predict_end_to_end(trained, tmp_path, capsys):
    run = trained / "run"
    for name in ("last.pth", "log.jsonl", "curves.png", "metrics.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*.png"))) == 1
    assert main(["eval", str(run / "last.pth"), "--data", str(trained / "ds"), "--out", str(tmp_path),
                 "--workers", "0"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox_mAP"] <= 1.0
    assert "Average Precision" in capsys.readouterr().out
    rc = main(["predict", str(run / "last.pth"), str(trained / "ds/val"), "--out", str(tmp_path / "pred"),
               "--score-thr", "0.0"])
    assert rc == 0
    dets = json.loads((tmp_path / "pred/detections.json").read_text())
    assert len(dets) == 2 and (tmp_path / "pred/000000.png").is_file()
    for item in dets:
        for d in item["detections"]:
            assert len(d["box_xyxy"]) == 4 and d["class"] in D.SYNTHETIC_CLASSES


def test_unreadable_image_and_checkpoint_are_named(trained, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert main(["predict", str(trained / "run/last.pth"), str(broken), "--out", str(tmp_path)]) == 2
    assert str(broken) in capsys.readouterr().err
    missing = tmp_path / "nothing.pth"
    assert main(["eval", str(missing), "--data", str(trained / "ds")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_info_and_bench(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu_backends" in out and "torch" in out
    assert main(["bench", "--img-size", "64", "--batch-size", "1", "--steps", "1", "--warmup", "0", "--num-classes", "3",
                 "--backend", "torch", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "train step" in out and "inference" in out and "images/s" in out
