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
    assert main(["predict", str(trained / "run/last.pth"), str(broken), "--out", str(tmp_path / "p")]) == 2
    assert str(broken) in capsys.readouterr().err
    assert json.loads((tmp_path / "p/detections.json").read_text())[0]["file"] == str(broken)
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


# ------------------------------------------------------------------ argument validation

@pytest.mark.parametrize("argv, flag", [
    (["--img-size", "100"], "--img-size"),          # not a multiple of 32
    (["--img-size", "0"], "--img-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--accumulate", "0"], "--accumulate"),
    (["--workers", "-1"], "--workers"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--mosaic-prob", "1.5"], "--mosaic-prob"),
    (["--log-interval", "0"], "--log-interval"),
    (["--eval-interval", "x"], "--eval-interval"),
    (["--amp", "fp8"], "--amp"),
    (["--augment-backend", "kornia"], "--augment-backend"),
])
def test_bad_train_arguments_exit_2_naming_the_flag(argv, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("rtmdet train: error: argument " + flag)
    assert not (tmp_path / "o").exists()          # nothing started


def test_device_without_cuda_and_bad_device(tmp_path, capsys):
    import torch
    if not torch.cuda.is_available():
        assert main(["train", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "--device cuda: CUDA is not available" in err and "Traceback" not in err
    assert main(["train", "--device", "tpu", "--out", str(tmp_path / "o")]) == 2
    assert "--device: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["predict", "x.pth", "y.png", "--device", "gpu7"]) == 2
    assert "--device" in capsys.readouterr().err


def test_batch_larger_than_dataset_is_one_line(trained, tmp_path, capsys):
    rc = main(["train", "--data", str(trained / "ds"), "--batch-size", "3", "--img-size", "64",
               "--workers", "0", "--out", str(tmp_path / "o"), "--no-progress", "--threads", "2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--batch-size: 3 images" in err and "the training set has 2" in err and "Traceback" not in err


def test_resume_with_another_model_or_other_classes(trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    common = ["--data", str(trained / "ds"), "--batch-size", "2", "--img-size", "64", "--workers", "0",
              "--out", str(run), "--no-progress", "--threads", "2", "--resume", "auto", "--epochs", "2"]
    assert main(["train", "--model", "s", *common]) == 2
    err = capsys.readouterr().err
    assert "--model s: checkpoint" in err and "RTMDet-tiny" in err and "Traceback" not in err
    # the same images with two category names swapped: an error, not a silent permutation
    ds = tmp_path / "swapped"
    shutil.copytree(trained / "ds", ds)
    for split in ("train", "val"):
        ann = ds / f"annotations/instances_{split}.json"
        gt = json.loads(ann.read_text())
        gt["categories"][0]["name"], gt["categories"][1]["name"] = (gt["categories"][1]["name"],
                                                                    gt["categories"][0]["name"])
        ann.write_text(json.dumps(gt))
    common[1] = str(ds)
    assert main(["train", *common]) == 2
    err = capsys.readouterr().err
    assert "differ from those of checkpoint" in err and "names or order" in err


def test_eval_keeps_the_training_runs_metrics(trained, capsys):
    run = trained / "run"
    before = (run / "metrics.json").read_bytes(), (run / "detections.json").read_bytes()
    assert main(["eval", str(run / "last.pth"), "--data", str(trained / "ds"), "--workers", "0",
                 "--score-thr", "0.5"]) == 0
    assert (run / "eval/metrics.json").is_file()             # default: CHECKPOINT_FOLDER/eval
    assert main(["eval", str(run / "last.pth"), "--data", str(trained / "ds"), "--workers", "0",
                 "--out", str(run), "--score-thr", "0.5"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ((run / "metrics.json").read_bytes(), (run / "detections.json").read_bytes()) == before


def test_predict_reports_an_unreadable_image_and_writes_the_others(trained, tmp_path, capsys):
    import shutil
    folder = tmp_path / "imgs"
    shutil.copytree(trained / "ds/val", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    rc = main(["predict", str(trained / "run/last.pth"), str(folder), "--out", str(tmp_path / "pred"),
               "--score-thr", "0.0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(folder / "broken.jpg") in err and "Traceback" not in err
    dets = json.loads((tmp_path / "pred/detections.json").read_text())
    assert len(dets) == 3
    broken = [d for d in dets if d["file"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["detections"] == []
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2


def test_old_format_checkpoint_gets_a_clear_error(tmp_path, capsys):
    import numpy as np
    import torch
    old = tmp_path / "old.pth"
    torch.save({"model": {}, "rng": [{"numpy": np.random.get_state()}], "config": {}}, old)
    assert main(["eval", str(old), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(old) in err and "arbitrary code" in err and "Traceback" not in err


def test_check_data_names_the_unreadable_image(tmp_path, capsys):
    D.write_synthetic_split(tmp_path / "ds", "train", 2, size=48)
    D.write_synthetic_split(tmp_path / "ds", "val", 1, size=48)
    image = sorted((tmp_path / "ds/train").iterdir())[0]
    image.write_bytes(image.read_bytes()[:40])
    rc = main(["train", "--data", str(tmp_path / "ds"), "--check-data", "--workers", "0",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert image.name in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["eval", "x.pth", "--img-size", "100"],
                                  ["eval", "x.pth", "--batch-size", "0"],
                                  ["predict", "x.pth", "a.png", "--score-thr", "2"],
                                  ["bench", "--img-size", "33"]])
def test_bad_eval_predict_bench_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err
