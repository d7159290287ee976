"""Unlearning updates against exact references: a strictly convex problem retrained to machine precision."""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest
from conftest import build, ravel

import jaxforget as jf
from jaxforget import unlearn

REG = 300.0  # L2 strength on the sum objective: strictly convex, and a Newton step from θ* lands close to retrain


def _digits():
    data = jf.embedded_dataset("digits")
    return jnp.asarray(data.inputs.reshape(len(data.labels), -1), jnp.float64), jnp.asarray(data.labels)


def _logistic_loss(num_train):
    """Mean cross-entropy plus REG / (2N) ‖θ‖²: N times it over the training set is the training objective."""

    def loss_fn(params, batch):
        logits = batch.inputs @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.labels).mean()
        return ce + REG / (2 * num_train) * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))

    return loss_fn


@pytest.fixture(scope="module")
def poisoned_regression():
    """Multinomial logistic regression on the 1,797 digits with 30 threes labelled as eights, and its retrain."""
    inputs, labels = _digits()
    n_train = len(labels)
    threes = np.flatnonzero(np.asarray(labels) == 3)
    group = np.sort(np.random.default_rng(0).choice(threes, 30, replace=False))
    poisoned_labels = labels.at[group].set(8)
    loss_fn = _logistic_loss(n_train)
    flat0, unravel = jax.flatten_util.ravel_pytree({"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)})

    @jax.jit
    def train_exactly(targets):  # Newton's method to machine precision
        objective = lambda flat: loss_fn(unravel(flat), jf.Batch(inputs, targets))  # noqa: E731
        step = lambda _, f: f - jnp.linalg.solve(jax.hessian(objective)(f), jax.grad(objective)(f))  # noqa: E731
        flat = jax.lax.fori_loop(0, 12, step, flat0)
        return unravel(flat), jnp.linalg.norm(jax.grad(objective)(flat))

    poisoned, poisoned_grad = train_exactly(poisoned_labels)
    clean, clean_grad = train_exactly(labels)
    assert poisoned_grad < 1e-13 and clean_grad < 1e-13
    return {
        "loss_fn": loss_fn,
        "poisoned": poisoned,
        "clean": clean,
        "old": jf.Batch(inputs[group], poisoned_labels[group]),
        "new": jf.Batch(inputs[group], labels[group]),
        "hessian_batches": unlearn.stack_batches([jf.Batch(inputs, poisoned_labels)]),
        "train": jf.Batch(inputs, poisoned_labels),
        "num_train": n_train,
    }


def _distance(a, b):
    return float(otu.tree_norm(otu.tree_sub(a, b)))


def _group_accuracy(params, group):
    return float(jnp.mean(jnp.argmax(group.inputs @ params["w"] + params["b"], -1) == group.labels))


def _second_order(problem, **kwargs):
    run = jax.jit(
        lambda p: unlearn.second_order_update(
            problem["loss_fn"], p, problem["old"], problem["new"], problem["hessian_batches"], **kwargs
        )
    )
    return run(problem["poisoned"])


@pytest.mark.parametrize("solver, options", [("cg", {"tol": 1e-12}), ("lissa", {"depth": 400, "tol": 1e-6})])
def test_second_order_full_mask_recovers_the_retrained_model(poisoned_regression, solver, options):
    p = poisoned_regression
    new_params, info = _second_order(p, solver=solver, damping=0.0, **options)
    before, after = _distance(p["poisoned"], p["clean"]), _distance(new_params, p["clean"])
    reduction = 1 - after / before
    print(f"{solver}: distance to retrain {before:.4g} -> {after:.4g}, reduction {reduction:.2%}")
    assert reduction >= 0.9  # measured: 96.1% for both solvers
    assert bool(info["converged"]) and not bool(info["diverged"])
    assert _group_accuracy(new_params, p["new"]) > _group_accuracy(p["poisoned"], p["new"])


def test_first_order_with_a_tuned_step_reduces_the_distance(poisoned_regression):
    p = poisoned_regression
    before = _distance(p["poisoned"], p["clean"])
    results = []
    for tau in 10.0 ** np.arange(-4.0, 0.0, 0.5):
        new_params, info = unlearn.first_order_update(p["loss_fn"], p["poisoned"], p["old"], p["new"], tau=tau)
        results.append((_distance(new_params, p["clean"]), tau, new_params, info))
    after, tau, best, info = min(results, key=lambda r: r[0])
    print(f"first order: best tau {tau:.3g}, distance {before:.4g} -> {after:.4g}")
    assert after < 0.9 * before  # measured: a 20% reduction at tau = 3.2e-4
    assert _group_accuracy(best, p["new"]) > _group_accuracy(p["poisoned"], p["new"])
    assert int(info["gradient_evals"]) == 2 and int(info["hvp_evals"]) == 0


def test_second_order_is_the_newton_step_of_the_sum_objective(poisoned_regression):
    """Δ = H⁻¹ g with H the dense Hessian of the sum over the N samples and g summed over the group."""
    p = poisoned_regression
    n_train, loss_fn = p["num_train"], p["loss_fn"]
    flat, unravel = jax.flatten_util.ravel_pytree(p["poisoned"])
    total = lambda f, batch: len(batch.labels) * loss_fn(unravel(f), batch)  # noqa: E731
    hessian = jax.jit(jax.hessian(total))(flat, p["train"])
    g = jax.grad(total)(flat, p["new"]) - jax.grad(total)(flat, p["old"])
    expected = flat - jnp.linalg.solve(hessian, g)
    new_params, _ = _second_order(p, damping=0.0, tol=1e-13, max_iterations=200)
    np.testing.assert_allclose(ravel(new_params), expected, rtol=0, atol=1e-11)

    # A Hessian from three equal batches of the same data is the same mean Hessian.
    thirds = unlearn.stack_batches(
        [jax.tree.map(lambda a, i=i: a[i * 599 : (i + 1) * 599], p["train"]) for i in range(3)]
    )
    split, _ = _second_order({**p, "hessian_batches": thirds}, damping=0.0, tol=1e-13, max_iterations=200)
    np.testing.assert_allclose(ravel(split), expected, rtol=0, atol=1e-11)
    # The same three batches as a plain list are stacked by the update itself: bitwise the same step.
    as_list = [jax.tree.map(lambda a, i=i: a[i], thirds) for i in range(3)]
    from_list, _ = _second_order({**p, "hessian_batches": as_list}, damping=0.0, tol=1e-13, max_iterations=200)
    chex.assert_trees_all_equal(from_list, split)

    # N is the scale: twice the training set halves the step (the mean Hessian is unchanged, ḡ = g / N halves).
    doubled, _ = _second_order(p, num_train=2 * n_train, damping=0.0, tol=1e-13, max_iterations=200)
    np.testing.assert_allclose(ravel(doubled) - ravel(p["poisoned"]), (expected - flat) / 2, rtol=0, atol=1e-11)


def test_masked_second_order_solves_the_selected_block(poisoned_regression):
    p = poisoned_regression
    mask = jf.select_random(p["poisoned"], 0.2, jax.random.key(3, impl="threefry2x32"))
    damping = 1e-3
    new_params, info = _second_order(p, mask=mask, damping=damping, tol=1e-13, max_iterations=300)

    flat, unravel = jax.flatten_util.ravel_pytree(p["poisoned"])
    mean_loss = lambda f: p["loss_fn"](unravel(f), p["train"])  # noqa: E731
    hessian = jax.jit(jax.hessian(mean_loss))(flat)
    total = lambda f, batch: len(batch.labels) * p["loss_fn"](unravel(f), batch)  # noqa: E731
    g_bar = (jax.grad(total)(flat, p["new"]) - jax.grad(total)(flat, p["old"])) / p["num_train"]
    s = ravel(mask)
    block = hessian[np.ix_(s, s)] + damping * np.eye(s.sum())
    expected = np.asarray(flat).copy()
    expected[s] -= np.linalg.solve(block, g_bar[s])
    np.testing.assert_allclose(ravel(new_params), expected, rtol=0, atol=1e-11)
    # Outside the mask: the same bits; every evaluation is counted.
    np.testing.assert_array_equal(ravel(new_params)[~s].view(np.uint64), np.asarray(flat)[~s].view(np.uint64))
    assert int(info["hvp_evals"]) == int(info["iterations"]) + 1 and int(info["gradient_evals"]) == 2


def test_lissa_counts_power_iterations_and_batches(poisoned_regression):
    p = poisoned_regression
    thirds = unlearn.stack_batches(
        [jax.tree.map(lambda a, i=i: a[i * 599 : (i + 1) * 599], p["train"]) for i in range(3)]
    )
    _, info = _second_order({**p, "hessian_batches": thirds}, solver="lissa", depth=30, power_iterations=5, tol=1.0)
    # power iteration on the mean over 3 batches (5 + 1 products each), 30 single-batch steps, the residual (3).
    assert int(info["hvp_evals"]) == 3 * 6 + 30 + 3
    _, info = _second_order({**p, "hessian_batches": thirds}, solver="lissa", depth=30, scale=5.0, tol=1.0)
    assert int(info["hvp_evals"]) == 30 + 3 and float(info["scale"]) == 5.0


def test_diagonal_newton_equals_second_order_on_a_diagonal_hessian():
    keys = jax.random.split(jax.random.key(0, impl="threefry2x32"), 4)
    params = {"a": jax.random.normal(keys[0], (4, 3)), "b": jax.random.normal(keys[1], (5,))}
    curvature = jax.tree.map(lambda p: jnp.linspace(0.5, 3.0, p.size).reshape(p.shape), params)

    def loss_fn(p, batch):  # ½ Σ d_i θ_i² − mean over the batch of x·θ: Hessian diag(d)
        quadratic = sum(
            0.5 * jnp.sum(d * w**2) for d, w in zip(jax.tree.leaves(curvature), jax.tree.leaves(p), strict=True)
        )
        flat = jax.flatten_util.ravel_pytree(p)[0]
        return quadratic - jnp.mean(batch.inputs @ flat) + 0.0 * jnp.sum(batch.labels)

    size = 17
    old = jf.Batch(jax.random.normal(keys[2], (6, size)), jnp.zeros(6, int))
    new = jf.Batch(jax.random.normal(keys[3], (6, size)), jnp.zeros(6, int))
    hessian_batches = unlearn.stack_batches([old, new])
    mask = jf.select_top(curvature, 0.5)
    for m in (None, mask):
        second, info = unlearn.second_order_update(
            loss_fn, params, old, new, hessian_batches, num_train=40, mask=m, damping=0.1, tol=1e-14
        )
        diagonal, _ = unlearn.diagonal_newton_update(
            loss_fn, params, old, new, curvature, num_train=40, mask=m, damping=0.1
        )
        np.testing.assert_allclose(ravel(diagonal), ravel(second), rtol=0, atol=1e-13)
        assert bool(info["converged"])
        assert not np.array_equal(ravel(diagonal), ravel(params))


def test_diagonal_newton_reports_where_the_curvature_changes_the_step():
    params = {"w": jnp.zeros(10)}
    curvature = {"w": jnp.asarray([0.0, 0.05, 0.1, 0.2, 1.0, 5.0, -3.0, 0.12, 0.11, 0.3])}

    def loss_fn(p, batch):
        return -jnp.mean(batch.inputs @ p["w"]) + 0.0 * jnp.sum(batch.labels)

    old = jf.Batch(jnp.zeros((2, 10)), jnp.zeros(2, int))
    new = jf.Batch(jnp.ones((2, 10)), jnp.zeros(2, int))
    # damping 1: the step shrinks by more than 10% where d > 1/9 = 0.111...: at 0.2, 1.0, 5.0, 0.12 and 0.3.
    _, info = unlearn.diagonal_newton_update(loss_fn, params, old, new, curvature, num_train=4, damping=1.0)
    assert float(info["curvature_share"]) == pytest.approx(0.5)
    mask = {"w": jnp.arange(10) < 4}  # 0.0, 0.05, 0.1, 0.2: one of four
    _, info = unlearn.diagonal_newton_update(loss_fn, params, old, new, curvature, num_train=4, mask=mask, damping=1.0)
    assert float(info["curvature_share"]) == pytest.approx(0.25)
    _, info = unlearn.diagonal_newton_update(loss_fn, params, old, new, curvature, num_train=4, damping=1e-3)
    assert float(info["curvature_share"]) == pytest.approx(0.8)  # all but the zero and the negative entry


def test_cg_on_negative_curvature_stops_warns_and_stays_finite():
    def loss_fn(p, batch):  # Hessian diag(1, −2): indefinite
        return 0.5 * (p[0] ** 2 - 2 * p[1] ** 2) - jnp.mean(batch.inputs @ p)

    params = jnp.zeros(2)
    old, new = jf.Batch(jnp.zeros((1, 2)), jnp.zeros(1)), jf.Batch(jnp.ones((1, 2)), jnp.zeros(1))
    with pytest.warns(RuntimeWarning, match="negative curvature"):
        new_params, info = unlearn.second_order_update(
            loss_fn, params, old, new, unlearn.stack_batches([old]), damping=0.0
        )
        jax.block_until_ready(new_params)
    assert bool(info["negative_curvature"]) and not bool(info["converged"])
    assert np.all(np.isfinite(np.asarray(new_params)))


def test_lissa_with_too_small_a_scale_diverges_loudly_and_changes_nothing(poisoned_regression):
    p = poisoned_regression
    with pytest.warns(RuntimeWarning, match="diverged"):
        new_params, info = _second_order(p, solver="lissa", scale=0.01, depth=100)
        jax.block_until_ready(new_params)
    assert bool(info["diverged"]) and not bool(info["converged"])
    np.testing.assert_array_equal(ravel(new_params).view(np.uint64), ravel(p["poisoned"]).view(np.uint64))


@pytest.mark.parametrize("update", ["first", "second", "lissa", "diagonal"])
def test_every_update_changes_only_masked_entries(poisoned_regression, update):
    p = poisoned_regression
    params = p["poisoned"]
    params = {**params, "w": params["w"].at[0, 0].set(-0.0)}  # a −0.0 outside the mask must keep its sign bit
    mask = jf.select_random(params, 0.1, jax.random.key(1, impl="threefry2x32"))
    mask = {**mask, "w": mask["w"].at[0, 0].set(False)}
    args = (p["loss_fn"], params, p["old"], p["new"])
    if update == "first":
        new_params, _ = unlearn.first_order_update(*args, tau=1e-2, mask=mask)
    elif update == "diagonal":
        diag = jf.exact_diagonal(p["loss_fn"], params, p["train"])
        new_params, _ = unlearn.diagonal_newton_update(*args, diag, num_train=p["num_train"], mask=mask)
    else:
        solver = "cg" if update == "second" else "lissa"
        new_params, _ = _second_order({**p, "poisoned": params}, mask=mask, solver=solver, tol=1e-3, depth=50)
    s, before, after = ravel(mask), ravel(params), ravel(new_params)
    np.testing.assert_array_equal(after[~s].view(np.uint64), before[~s].view(np.uint64))
    changed = after != before
    if update in ("first", "diagonal"):  # element-wise steps: exactly the selected entries with a gradient
        g = ravel(unlearn.gradient_difference(*args))
        np.testing.assert_array_equal(changed, s & (g != 0))
    else:  # the solve couples the selected entries: most of them move
        assert changed.sum() > 0.5 * s.sum()


def test_finetune_unlearn_moves_only_selected_parameters_and_fits_the_corrected_group():
    params, batch, _, _ = build(jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True), (8, 8, 8, 1))
    model = jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True)
    variables = jax.jit(lambda k: jf.init_model(model, k, (1, 8, 8, 1)))(jax.random.key(0))
    state = jf.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.sgd(0.1),
        batch_stats=jax.tree.map(lambda a: a + 0.3, variables["batch_stats"]),
    )
    old = batch
    new = jf.Batch(batch.inputs, (batch.labels + 1) % 10)
    retain = jf.Batch(-batch.inputs, batch.labels)
    mask = jf.select_random(params, 0.3, jax.random.key(2, impl="threefry2x32"))
    final, info = unlearn.finetune_unlearn(
        state, new, [retain], tx=optax.adam(1e-2), mask=mask, steps=30, old_batches=old, ascent_weight=0.1
    )
    s, before, after = ravel(mask), ravel(state.params), ravel(final.params)
    np.testing.assert_array_equal(after[~s].view(np.uint64), before[~s].view(np.uint64))
    assert np.mean(after[s] != before[s]) > 0.9
    np.testing.assert_array_equal(ravel(final.batch_stats), ravel(state.batch_stats))
    assert info["steps"] == 30 and info["gradient_evals"] == 90
    assert info["loss"][-1] < info["loss"][0]
    assert float(info["update_norm"]) == pytest.approx(np.linalg.norm(after - before))


def _raising_loss(params, batch):
    raise AssertionError("argument checks must come before any compute")


W = {"w": jnp.ones(2)}
OLD = jf.Batch(jnp.ones((4, 2)), jnp.zeros(4, int))
NEW = jf.Batch(jnp.zeros((4, 2)), jnp.zeros(4, int))
EMPTY = jf.Batch(jnp.ones((0, 2)), jnp.zeros(0, int))
HESSIAN = unlearn.stack_batches([OLD, NEW])
FIRST = functools.partial(unlearn.first_order_update, _raising_loss, W)
SECOND = functools.partial(unlearn.second_order_update, _raising_loss, W)
DIAGONAL = functools.partial(unlearn.diagonal_newton_update, _raising_loss, W)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FIRST(EMPTY, EMPTY, tau=1.0), "empty"),
        (lambda: FIRST(OLD, jf.Batch(NEW.inputs[:2], NEW.labels[:2]), tau=1.0), "new_batch has 2"),
        (lambda: FIRST(OLD, NEW, tau=0.0), "tau"),
        (lambda: FIRST(OLD, NEW, tau=-1.0), "tau"),
        (lambda: SECOND(OLD, NEW, HESSIAN, damping=-1e-3), "damping"),
        (lambda: SECOND(OLD, NEW, HESSIAN, solver="lbfgs"), "solver"),
        (lambda: SECOND(OLD, NEW, OLD), "stack_batches"),
        (lambda: SECOND(OLD, NEW, [OLD, jf.Batch(NEW.inputs[:2], NEW.labels[:2])]), "different sizes"),
        (lambda: SECOND(OLD, NEW, [OLD, {"x": NEW.inputs}]), "list of batches"),
        (lambda: SECOND(OLD, NEW, []), "list of batches"),
        (lambda: SECOND(OLD, NEW, HESSIAN, num_train=2), "num_train"),
        (lambda: SECOND(OLD, NEW, HESSIAN, mask={"w": jnp.ones(3, bool)}), "mask"),
        (lambda: DIAGONAL(OLD, NEW, {"w": jnp.ones(2)}, num_train=10, damping=0.0), "damping"),
        (lambda: DIAGONAL(OLD, NEW, {"v": jnp.ones(2)}, num_train=10), "curvature"),
    ],
)
def test_bad_input_is_rejected_before_any_compute(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_finetune_rejects_ascent_without_the_old_group():
    state = jf.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1))
    batch = jf.Batch(jnp.ones((2, 2)), jnp.zeros(2, int))
    with pytest.raises(ValueError, match="old_batches"):
        unlearn.finetune_unlearn(state, batch, tx=optax.sgd(0.1), mask=None, steps=3, ascent_weight=1.0)
    with pytest.raises(ValueError, match="steps"):
        unlearn.finetune_unlearn(state, batch, tx=optax.sgd(0.1), mask=None, steps=0)


def test_updates_jit_and_match_eager(poisoned_regression):
    p = poisoned_regression
    args = (p["loss_fn"], p["poisoned"], p["old"], p["new"], p["hessian_batches"])
    eager, _ = unlearn.second_order_update(*args, damping=1e-2, tol=1e-10)
    jitted, _ = jax.jit(functools.partial(unlearn.second_order_update, damping=1e-2, tol=1e-10), static_argnums=0)(
        *args
    )
    np.testing.assert_allclose(ravel(jitted), ravel(eager), rtol=0, atol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve warns about nothing
        jax.block_until_ready(jitted)


def test_finetune_step_is_the_step_finetune_unlearn_takes():
    model = jf.CNN(features=(3, 4), hidden=8, use_batch_norm=True)
    variables = jax.jit(lambda k: jf.init_model(model, k, (1, 8, 8, 1)))(jax.random.key(0))
    tx = optax.adam(1e-2)
    state = jf.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, batch_stats=variables["batch_stats"]
    )
    inputs = jax.random.normal(jax.random.key(1), (8, 8, 8, 1), jnp.float32)
    new = jf.Batch(inputs, jnp.arange(8) % 10)
    retain = jf.Batch(-inputs, (jnp.arange(8) + 3) % 10)
    mask = jf.select_random(state.params, 0.3, jax.random.key(2, impl="threefry2x32"))
    looped, _ = unlearn.finetune_unlearn(state, new, [retain], tx=tx, mask=mask, steps=1)
    frozen = state.replace(
        tx=jf.freeze_unselected(tx, mask), opt_state=jf.freeze_unselected(tx, mask).init(state.params)
    )
    stepped, metrics = jax.jit(unlearn.finetune_step)(frozen, new, retain)
    np.testing.assert_array_equal(ravel(stepped.params), ravel(looped.params))
    assert int(looped.step) == int(stepped.step) == 1 and float(metrics["loss"]) > float(metrics["new_loss"])
