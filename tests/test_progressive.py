"""Progressive distillation (`sdejax.progressive`) against its definitions and a Gaussian closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdejax import progressive as pd
from sdejax import sde as sde_lib
from sdejax.precond import Precond
from sdejax.training.objective import Context

SDES = {"vp": sde_lib.VPSDE(), "ve": sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0), "subvp": sde_lib.subVPSDE(),
        "edm": sde_lib.EDMSDE()}


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("name", sorted(SDES))
def test_student_step_on_x_target_lands_on_teacher_result(name):
    """(1) One DDIM step t → t'' from z_t with x̂₀ = x̃ returns z_{t''}: the DDIM step is
    z'' = (σ''/σ) z + (α'' − (σ''/σ) α) x̂₀, and x̃ solves it for x̂₀, so they agree to float64
    rounding (relative 1e-12, the two divisions and products of O(1) numbers, amplified by at most
    1/(α'' − σ''α/σ) ≤ 1e2 on these grids)."""
    sde = SDES[name]
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    z, z_end = jax.random.normal(k1, (6, 3), jnp.float64), jax.random.normal(k2, (6, 3), jnp.float64)
    i, n = jnp.array([1, 2, 4, 8, 16, 16]), 16
    t, _, t_end = pd.pd_times(sde, i, n, sde.sampling_eps, jnp.float64)
    student = pd.ddim0(sde, z, pd.x_target(sde, z, z_end, t, t_end), t, t_end)
    np.testing.assert_allclose(student, z_end, rtol=1e-10, atol=1e-12)


def test_times_weight_and_schedule_definitions():
    """(2) t − t' = t' − t'' = (T − eps)/(2N), t_N = T, t''_1 = eps; w = max(α²/σ², 1) and
    w‖x − x̂‖² = max(‖x − x̂‖², ‖ε − ε̂‖²) in 1-D (ε − ε̂ = −(α/σ)(x − x̂) at fixed z); N(k) and μ(k)
    equal the lists written out for N₀ = 8, K = 3 (exact integers / 0-1 values)."""
    sde, eps, n = SDES["vp"], 1e-3, 4
    t, tm, te = pd.pd_times(sde, jnp.arange(1, n + 1), n, eps, jnp.float64)
    np.testing.assert_allclose(t - tm, (sde.T - eps) / (2 * n), rtol=1e-12)
    np.testing.assert_allclose(tm - te, (sde.T - eps) / (2 * n), rtol=1e-12)
    assert float(t[-1]) == pytest.approx(sde.T, rel=1e-14) and float(te[0]) == pytest.approx(eps, rel=1e-14)
    alpha, sigma = sde.marginal_coeffs(t)
    w = pd.pd_weight(sde, t)
    np.testing.assert_array_equal(w, np.maximum(np.asarray(alpha) ** 2 / np.asarray(sigma) ** 2, 1.0))
    np.testing.assert_array_equal(pd.pd_weight(sde, t, "uniform"), np.ones(n))
    x, x_hat, zz = 0.7, -0.3, 1.1
    e, e_hat = (zz - alpha * x) / sigma, (zz - alpha * x_hat) / sigma
    np.testing.assert_allclose(w * (x - x_hat) ** 2, np.maximum((x - x_hat) ** 2, (e - e_hat) ** 2), rtol=1e-12)
    steps = jnp.arange(12)
    assert pd.pd_num_steps(steps, 3, 8).tolist() == [4] * 3 + [2] * 3 + [1] * 6
    assert pd.pd_target_rate(steps, 3).tolist() == [1, 1, 0] * 4
    with pytest.raises(ValueError, match="power of two"):
        pd.pd_num_steps(0, 3, 12)
    with pytest.raises(ValueError, match="valid"):
        pd.pd_weight(sde, t, "snr")


def test_objective_equals_hand_computation():
    """(2) The objective's per-example loss is w(t)·mean((x̂₀^θ(z_t) − x̃)²) with z_t, t, t'' and the
    teacher's two DDIM steps recomputed here from the same draws (same float64 operations: 1e-12)."""
    sde, eps = SDES["vp"], 1e-3
    apply_fn = lambda p, x, labels, train, rng: p["s"] * x + p["c"] * labels[:, None]  # noqa: E731
    teacher_p, student_p = {"s": 0.4, "c": 0.2}, {"s": 0.5, "c": -0.1}
    obj = pd.pd_objective(apply_fn, sde, Precond.plain("x0"), 4, eps=eps)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2), jnp.float64)
    batch = {"x": x, "index": jnp.arange(8)}
    ctx = Context(step=jnp.int32(0), ema_params=None, target_params=teacher_p)
    loss, aux = obj(student_p, jax.random.PRNGKey(2), batch, ctx)
    t, _, t_end = pd.pd_times(sde, aux["level"], 4, eps, jnp.float64)
    np.testing.assert_allclose(aux["t"], t, rtol=1e-14)
    _, z_keys, _ = jax.random.split(jax.random.PRNGKey(2), 3)
    noise = jax.vmap(lambda k: jax.random.normal(k, (2,), jnp.float64))(
        jax.vmap(jax.random.fold_in, in_axes=(None, 0))(z_keys, jnp.arange(8)))
    a, s = (v[:, None] for v in sde.marginal_coeffs(t))
    z = a * x + s * noise
    x0 = lambda p, zz, tt: p["s"] * zz + p["c"] * 999 * tt[:, None]  # noqa: E731  (labels 999 t)
    z_end = pd.teacher_two_steps(sde, lambda zz, tt: x0(teacher_p, zz, tt), z, t, t - (t - t_end) / 2, t_end)
    want = pd.pd_weight(sde, t) * np.mean((x0(student_p, z, t) - pd.x_target(sde, z, z_end, t, t_end)) ** 2, -1)
    np.testing.assert_allclose(aux["losses"], want, rtol=1e-12)
    assert float(loss) == pytest.approx(float(np.mean(want)), rel=1e-12)


# (3) Gaussian data: k halvings of an affine student reproduce the teacher's 2^k-step DDIM map ------------
N0, MU, SD, EPS = 8, 1.5, 0.5, 1e-3


def _table_apply(params, x, labels, train, rng):
    """x̂₀ = a_j z + b_j with j = (t − eps)/(T − eps)·N₀ the grid point of t (`Precond.plain("x0")`:
    labels 999 t, T = 1)."""
    j = jnp.round((labels / 999 - EPS) / (1.0 - EPS) * N0).astype(jnp.int32)
    return params["a"][j][:, None] * x + params["b"][j][:, None]


def _exact_params(sde):
    """E[x | z_t] = μ + α s²/(α² s² + σ²)(z − αμ) of N(μ, s²) at the grid times."""
    alpha, sigma = sde.marginal_coeffs(pd.grid_time(sde, jnp.arange(N0 + 1) / N0, EPS))
    a = alpha * SD**2 / (alpha**2 * SD**2 + sigma**2)
    return {"a": a, "b": MU - a * alpha * MU}


def _ddim_map(sde, params, n):
    """(slope, offset) of the n-step DDIM map z_T → z_eps of the table network (affine in z_T)."""
    z = jnp.array([[0.0], [1.0]])
    ts = pd.grid_time(sde, jnp.arange(n, -1, -1) / n, EPS)
    for t, s in zip(ts[:-1], ts[1:]):
        tb, sb = jnp.full((2,), t), jnp.full((2,), s)
        z = pd.ddim0(sde, z, _table_apply(params, z, 999 * tb, False, None), tb, sb)
    return jnp.array([z[1, 0] - z[0, 0], z[0, 0]])


def test_halvings_reproduce_teacher_map_gaussian():
    """(3) The teacher's x̂₀ and the student are affine in z at each time, so x̃(z_t) is affine in z_t
    and each student level has the exact least-squares fit θ*_i = (∂x̃/∂z, x̃(0)), read off the
    teacher in closed form; then the student's one step equals the teacher's two for every z and
    after k stages its N₀/2^k-step map is the teacher's N₀-step map. The loss is a positive-definite
    quadratic in the trained entries (≥ 2 distinct z per level), so L-BFGS stopped at gradient norm
    g has ‖θ − θ*‖ ≤ g/λ_min(H) (H its Hessian); the map is multilinear in θ, so a stage moves it by
    ≤ 2‖J‖ g/λ_min (J its Jacobian in θ); the test sums that over the stages plus 1e-12 rounding."""
    sde = SDES["vp"]
    teacher = _exact_params(sde)
    x = MU + SD * jax.random.normal(jax.random.PRNGKey(3), (256, 1), jnp.float64)
    batch, rng = {"x": x, "index": jnp.arange(256)}, jax.random.PRNGKey(4)
    params, bound = teacher, 1e-12
    for stage in range(pd.num_stages(N0)):
        n = N0 // 2 ** (stage + 1)
        obj = pd.pd_objective(_table_apply, sde, Precond.plain("x0"), n, eps=EPS)
        ctx = Context(step=jnp.int32(0), ema_params=None, target_params=params)
        loss = lambda p: obj(p, rng, batch, ctx)[0]  # noqa: E731
        student = _lbfgs(loss, params)
        rows = np.arange(N0 // n, N0 + 1, N0 // n)  # the student's levels on the table
        flat = lambda p: jnp.concatenate([p["a"][rows], p["b"][rows]])  # noqa: E731
        unflat = lambda v: {"a": student["a"].at[rows].set(v[:rows.size]),  # noqa: E731
                            "b": student["b"].at[rows].set(v[rows.size:])}
        hess = jax.jit(jax.hessian(lambda v: loss(unflat(v))))(flat(student))
        g = float(jnp.linalg.norm(jax.jit(jax.grad(lambda v: loss(unflat(v))))(flat(student))))
        delta = g / float(jnp.linalg.eigvalsh(hess)[0])
        star = _closed_form(sde, params, n)
        assert float(jnp.max(jnp.abs(flat(student) - jnp.concatenate([star["a"][rows], star["b"][rows]])))) <= delta + 1e-12
        jac = jax.jit(jax.jacfwd(lambda v: _ddim_map(sde, unflat(v), n)))(flat(student))
        bound += 2 * float(jnp.linalg.norm(jac, 2)) * delta
        params = student
        np.testing.assert_allclose(_ddim_map(sde, star, n), _ddim_map(sde, teacher, N0), atol=1e-12 * (stage + 2))
    np.testing.assert_allclose(_ddim_map(sde, params, 1), _ddim_map(sde, teacher, N0), atol=bound)
    assert bound < 1e-6  # the optimiser did converge (otherwise the comparison above would be vacuous)


def _closed_form(sde, teacher, n):
    """θ*: at each student level t_i, (slope, offset) of x̃(z) = the x̂₀ of the teacher's two steps."""
    star = dict(teacher)
    x0_fn = lambda z, t: _table_apply(teacher, z, 999 * t, False, None)  # noqa: E731
    for i in range(1, n + 1):
        t, tm, te = (jnp.full((2,), v) for v in pd.pd_times(sde, i, n, EPS, jnp.float64))
        z = jnp.array([[0.0], [1.0]])
        xt = pd.x_target(sde, z, pd.teacher_two_steps(sde, x0_fn, z, t, tm, te), t, te)
        j = i * (N0 // n)
        star = {"a": star["a"].at[j].set(xt[1, 0] - xt[0, 0]), "b": star["b"].at[j].set(xt[0, 0])}
    return star


def _lbfgs(loss, params, steps=200, tol=1e-13):
    """optax L-BFGS (with its zoom line search) on `loss` until the gradient norm is below `tol`."""
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, new_state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return (optax.apply_updates(p, updates), new_state), optax.global_norm(grad)

    carry = (params, opt.init(params))
    for _ in range(steps):
        new_carry, gnorm = step(carry)
        if float(gnorm) < tol:  # the gradient at carry's parameters
            break
        carry = new_carry
    return carry[0]
