"""The paper-scale scripts (experiments/paper_*.py), run offline on tiny synthetic data sets prepared in tfds' own
on-disk format: the data path, the training recipe, two devices and the resume, at a size that runs in a minute.

ResNet-18 is swapped for the CNN here (``--model cnn``): the whole pipeline on ResNet-18 compiles for minutes on 2
CPU cores; the ResNet itself is tested in test_models and test_curvature.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from tfds_fakes import prepare_fake_tfds

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--seeds", "0", "--scenarios", "label-flip", "--train-steps", "6", "--batch-size", "16", "--group-size", "20",
    "--validation-size", "50", "--holdout-size", "50", "--selections", "hessian-largest,fisher-largest",
    "--updates", "first-order", "--probes", "1", "--finetune-steps", "2", "--relearn-steps", "2",
    "--timing-repeats", "1", "--quiet",
]  # fmt: skip


def run_script(name, *args, devices=1, timeout=600):
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices > 1:
        environment["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / name), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    prepare_fake_tfds("cifar10", root, {"train": 400, "test": 60})
    return root


@pytest.mark.parametrize("script", ["paper_mnist_cnn.py", "paper_cifar10_resnet18.py"])
def test_plan_prints_every_run_and_an_expected_gpu_time(script):
    result = run_script(script, "--plan", "--seeds", "0,1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "2 scenario(s) x 2 seed(s); expected on one GPU: about" in lines[0] and "not measured" in lines[0]
    runs = [line for line in lines if line.startswith("jaxforget run ")]
    assert len(runs) == 2 and "--scenario backdoor" in runs[1] and "--scenario" not in runs[0]
    every_update = "--updates first-order,diagonal-newton,finetune,finetune-corrected,finetune-ascent,cg"
    assert all(every_update in run for run in runs)


def test_bad_scenario_fails_before_compute():
    result = run_script("paper_mnist_cnn.py", "--scenarios", "label-flip,poison", "--plan")
    assert result.returncode == 2 and "--scenarios: poison chosen" in result.stderr


def test_cifar10_script_runs_on_tfds_data_over_two_devices_and_resumes(fake_cifar10, tmp_path):
    arguments = [
        "--data-dir", str(fake_cifar10), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "--model", "cnn", "--devices", "2", *TINY,
    ]  # fmt: skip
    first = run_script("paper_cifar10_resnet18.py", *arguments, devices=2)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "label-flip" / "results.json").read_text())
    config = results["config"]
    assert (config["dataset"], config["optimizer"], config["augment"]) == ("cifar10", "sgd", "crop-flip")
    assert config["weight_decay"] == 5e-4 and config["learning_rate"] == 0.1
    assert results["devices_used"] == 2
    rows = {row["method"]: row for row in results["rows"]}
    assert {"poisoned", "retrained", "hessian-largest/first-order", "fisher-largest/first-order"} <= set(rows)

    again = run_script("paper_cifar10_resnet18.py", *arguments, devices=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished" in again.stdout
    rerun = json.loads((tmp_path / "out" / "label-flip" / "results.json").read_text())
    # Every stage was reused: the same stage times (a reused stage keeps the time of its first run), the same rows.
    assert rerun["stage_seconds"] == results["stage_seconds"]
    assert [r["test_accuracy"] for r in rerun["rows"]] == [r["test_accuracy"] for r in results["rows"]]

    # One device gives the two-device numbers, to floating-point drift (the reproduction check's tolerance).
    one = [a if a not in (str(tmp_path / "work"), str(tmp_path / "out")) else a + "-one" for a in arguments]
    one[one.index("--devices") + 1] = "1"
    single = run_script(
        "paper_cifar10_resnet18.py", *one, "--check-reproduction", str(tmp_path / "out" / "label-flip"), devices=2
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    comparison = json.loads((tmp_path / "out-one" / "label-flip" / "reproduction.json").read_text())
    assert comparison["beyond_drift"] == [] and comparison["compared"] > 0
    assert json.loads((tmp_path / "out-one" / "label-flip" / "results.json").read_text())["devices_used"] == 1
