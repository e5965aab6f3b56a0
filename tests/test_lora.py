"""LoRA adapters (`sdejax.models.lora`): W' = W + s·reshape(A B), s = α/r.

Oracles: at B = 0 the adapted network *is* the base (bitwise, merged and unmerged); the unmerged
forward (base + s·down(x) B, never forming W') equals the merged network to a floating-point bound
derived per layer (γ_K·|terms|) and, through a whole U-Net, in float64; the chain rule at B = 0
(∂L/∂A = 0, ∂L/∂B ≠ 0) and the stop_gradient on the base (∂L/∂base = 0); Eckart–Young for a
rank-limited fit; exact counts from the architectures' definitions; a bitwise orbax round trip.
"""
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdejax.models import lora
from sdejax.models.layers import NIN
from sdejax.models.mlp import MLP, make_apply_fn
from sdejax.models.registry import count_params, dummy_inputs, get_model
from sdejax.models.up_down import FIRConv2d

EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff u


def gamma(k: int) -> float:
    """Higham's γ_k = k u / (1 − k u): bound on the relative error of a k-term float32 sum of products."""
    return k * EPS32 / (1 - k * EPS32)


def randomise_b(adapter, seed: int, std: float = 0.5):
    """The adapter with B ~ N(0, std²) (A unchanged), so every branch contributes."""
    def f(path, v):
        is_b = str(getattr(path[-1], "key", path[-1])) == "B"
        return std * jax.random.normal(jax.random.key(seed + len(path) + v.size), v.shape) if is_b else v
    return jax.tree_util.tree_map_with_path(f, adapter)


def trees_equal(a, b) -> bool:
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


class Layer(nn.Module):
    """One layer as a network with the sdejax call signature (labels ignored)."""
    layer: nn.Module

    @nn.compact
    def __call__(self, x, labels, train=False):
        return self.layer(x)


# Dense, a strided/dilated/asymmetrically padded Conv, NIN and both FIR resampling convs: each with
# the input shape it takes, and K ≥ the number of products in one output sum of the merged layer
# (kernel taps × input channels, times 16 FIR taps for the FIR convs) plus r for the branch.
LAYERS = {
    "dense": (nn.Dense(5), (3, 7), 7),
    "conv": (nn.Conv(6, (3, 3), strides=(2, 2), padding=((1, 2), (0, 1)), kernel_dilation=(2, 1)), (2, 9, 9, 4), 36),
    "nin": (NIN(5, init_scale=1.0), (2, 4, 4, 4), 4),
    "fir_down": (FIRConv2d(6, 3, down=True), (2, 8, 8, 4), 16 * 36),
    "fir_up": (FIRConv2d(6, 3, up=True), (2, 4, 4, 4), 16 * 36),
}
RANK, SCALE = 2, 1.5


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer_case(request):
    module, shape, k = LAYERS[request.param]
    net = Layer(module)
    x = jax.random.normal(jax.random.key(0), shape)
    params = net.init(jax.random.key(1), x, jnp.ones(shape[:1]))
    params = jax.tree_util.tree_map(lambda v: v + 0.1, params)  # nonzero biases
    apply_fn = lambda p, x, labels, *, train=False, rng=None: net.apply(p, x, labels, train=train)
    return request.param, net, apply_fn, params, x, k


def test_zero_up_projection_is_the_base_bitwise(layer_case):
    """B = 0 ⇒ A B = 0 exactly, so W' = W + 0 = W and base + s·(h·0) = base: equal bit for bit."""
    _, _, apply_fn, params, x, _ = layer_case
    adapter = lora.init_lora(jax.random.key(2), params, RANK)
    labels = jnp.ones(x.shape[:1])
    assert trees_equal(lora.merge(params, adapter, SCALE), params)
    np.testing.assert_array_equal(lora.lora_apply_fn(apply_fn, params, SCALE)(adapter, x, labels),
                                  apply_fn(params, x, labels))


def test_merged_and_unmerged_match_the_exact_merged_layer(layer_case):
    """Reference: the merged layer in float64 (kernel W + s·A B formed in float64). Each float32 output
    is a sum of ≤ K + 3 products (K kernel/FIR taps, r branch terms, bias, the add of s·AB), so
    |out₃₂ − ref| ≤ γ_{K+r+3} · |layer|(|x|; |W| + s|A||B|, |b|) (Higham, Thm 3.5; all FIR taps > 0).
    The merged kernel itself is within γ_{r+1}(|W| + s|A||B|) of W + s·A B."""
    name, net, apply_fn, params, x, k = layer_case
    adapter = randomise_b(lora.init_lora(jax.random.key(2), params, RANK), seed=3)
    labels = jnp.ones(x.shape[:1])
    merged = lora.merge(params, adapter, SCALE)
    outs = {"unmerged": lora.lora_apply_fn(apply_fn, params, SCALE)(adapter, x, labels),
            "merged": apply_fn(merged, x, labels)}
    (path, (a, b)), = lora.adapter_entries(adapter).items()
    kname = path.rsplit("/", 1)[1]
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), t)
        net64 = Layer(net.layer.clone(dtype=jnp.float64))
        p64, a64, b64 = f64(params), np.asarray(a, np.float64), np.asarray(b, np.float64)
        w64 = p64["params"]["layer"][kname]
        exact_w = w64 + SCALE * (a64 @ b64).reshape(w64.shape)
        abs_w = np.abs(w64) + SCALE * (np.abs(a64) @ np.abs(b64)).reshape(w64.shape)
        with_kernel = lambda w, absolute: {"params": {"layer": {
            n: (w if n == kname else (np.abs(v) if absolute else v)) for n, v in p64["params"]["layer"].items()}}}
        ref = np.asarray(net64.apply(with_kernel(exact_w, False), np.asarray(x, np.float64), labels))
        bound = gamma(k + RANK + 3) * np.asarray(net64.apply(with_kernel(abs_w, True), np.abs(np.asarray(x, np.float64)), labels))
    merged_w = np.asarray(merged["params"]["layer"][kname], np.float64)
    assert np.all(np.abs(merged_w - exact_w) <= gamma(RANK + 1) * abs_w), name
    for kind, out in outs.items():
        err = np.abs(np.asarray(out, np.float64) - ref)
        assert np.all(err <= bound), (name, kind, float(np.max(err / bound)))
    assert np.max(np.abs(ref - np.asarray(apply_fn(params, x, labels)))) > 1e3 * np.max(bound)  # the branch matters


# --- the toy MLP: selection, counts, gradients ----------------------------------------------------------------
F, E, D, L = 16, 8, 2, 2  # features, embedding size, data dim, depth


@pytest.fixture(scope="module")
def mlp():
    model = MLP(features=F, depth=L, embedding_size=E)
    x = jax.random.normal(jax.random.key(0), (8, D))
    labels = jnp.linspace(1.0, 999.0, 8)
    params = model.init(jax.random.key(1), x, labels)
    # A "trained" base: random kernels everywhere (the MLP's zero-initialised output layer would
    # otherwise block every gradient upstream of it).
    params = jax.tree_util.tree_map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(v.size), v.shape), params)
    return make_apply_fn(model), params, x, labels


def test_mlp_selection_and_parameter_count(mlp):
    """MLP kernels in construction order (flax names `Dense(F)(act(Dense(F)(emb)))` outer first):
    Dense_0 (F,F), Dense_1 (E,F) embed the time; Dense_2 (D,F)
    the input; per block three (F,F); Dense_last (F,D). The adapter holds Σ r(fan_in + out) scalars."""
    _, params, _, _ = mlp
    r = 2
    full = lora.init_lora(jax.random.key(0), params, r)
    n_dense = 3 + 3 * L + 1
    assert set(lora.adapter_entries(full)) == {f"params/Dense_{i}/kernel" for i in range(n_dense)}
    assert count_params(full) == r * ((E + F) + 2 * F + (D + F) + L * 3 * 2 * F + (F + D))
    time_embed = lora.init_lora(jax.random.key(0), params, r, targets=r"/Dense_[01]/")
    assert set(lora.adapter_entries(time_embed)) == {"params/Dense_0/kernel", "params/Dense_1/kernel"}
    square = lora.init_lora(jax.random.key(0), params, r, targets=lambda path, shape: shape == (F, F))
    assert len(lora.adapter_entries(square)) == 1 + 3 * L and count_params(square) == r * 2 * F * (1 + 3 * L)
    (a, b), = lora.adapter_entries(time_embed)["params/Dense_1/kernel"],
    assert a.shape == (E, r) and b.shape == (r, F) and not np.any(b)


def test_gradients_reach_only_the_adapter(mlp):
    """L = ‖f(x) − y‖². At B = 0: ∂L/∂A = xᵀ(g Bᵀ) = 0 exactly, ∂L/∂B = (x A)ᵀ g ≠ 0 for every layer;
    the base enters through stop_gradient, so ∂L/∂base = 0 exactly; an optax step moves only the adapter."""
    apply_fn, params, x, labels = mlp
    adapter = lora.init_lora(jax.random.key(2), params, 2)
    target = jax.random.normal(jax.random.key(3), x.shape)
    loss = lambda f, ad: jnp.sum((f(ad, x, labels) - target) ** 2)
    f = lora.lora_apply_fn(apply_fn, params, 1.0)
    g_f, g_ad = jax.jit(jax.grad(loss, argnums=(0, 1)))(f, adapter)
    for path, (ga, gb) in lora.adapter_entries(g_ad).items():
        assert not np.any(ga) and np.any(gb), path
    assert not any(np.any(v) for v in jax.tree_util.tree_leaves(g_f))
    opt = optax.adam(1e-2)
    updates, _ = opt.update(g_ad, opt.init(adapter), adapter)
    stepped = optax.apply_updates(adapter, updates)
    assert trees_equal(f.args[0], params) and loss(f, stepped) < loss(f, adapter)


# --- Eckart–Young: a rank-limited fit of a frozen linear base ----------------------------------------------------
def fit_low_rank(rank: int, steps: int = 1500):
    """Frozen W₀ (8, 6), target W₀ + Δ with Δ = U diag(2, 1) Vᵀ (rank 2); inputs X = I₈, so the loss
    ‖X(W₀ + A B) − X(W₀ + Δ)‖²_F = ‖A B − Δ‖²_F. Returns (final loss, Eckart–Young optimum)."""
    net = Layer(nn.Dense(6, use_bias=False))
    x = jnp.eye(8)
    params = net.init(jax.random.key(0), x, jnp.ones(8))
    u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (8, 2)))
    v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (6, 2)))
    sigma = jnp.array([2.0, 1.0])
    target = params["params"]["layer"]["kernel"] + (u * sigma) @ v.T
    apply_fn = lambda p, x, labels, *, train=False, rng=None: net.apply(p, x, labels)
    f = lora.lora_apply_fn(apply_fn, params, 1.0)
    loss = lambda ad: jnp.sum((f(ad, x, jnp.ones(8)) - target) ** 2)
    opt = optax.adam(optax.exponential_decay(0.05, steps, 1e-3))

    def step(carry, _):
        ad, state = carry
        g = jax.grad(loss)(ad)
        updates, state = opt.update(g, state, ad)
        return (optax.apply_updates(ad, updates), state), None

    adapter = lora.init_lora(jax.random.key(3), params, rank)
    (adapter, _), _ = jax.lax.scan(step, (adapter, opt.init(adapter)), None, length=steps)
    return float(loss(adapter)), float(jnp.sum(sigma[rank:] ** 2))


def test_rank_r_adapter_fits_a_rank_r_update_and_rank_r_minus_1_cannot():
    """Eckart–Young: min over rank-k M of ‖M − Δ‖²_F = Σ_{i>k} σ_i². Rank 2: optimum 0 (reached to
    1e-6·‖Δ‖² = 5e-6); rank 1: no adapter can go below σ₂² = 1 (a hard bound, less float32 rounding
    of a 48-term loss, 1e-5), and training reaches it to 1 %."""
    loss2, opt2 = fit_low_rank(2)
    loss1, opt1 = fit_low_rank(1)
    assert opt2 == 0.0 and loss2 < 5e-6
    assert opt1 == 1.0 and opt1 * (1 - 1e-5) <= loss1 <= 1.01 * opt1


# --- a tiny NCSN++ (Dense, Conv, NIN attention, FIR resampling conv) --------------------------------------------
@pytest.fixture(scope="module")
def ncsnpp():
    config = importlib.import_module("configs.tiny.ncsnpp_ve").get_config()
    model = get_model(config)
    x, _ = dummy_inputs(config, batch_size=2)
    x = jax.random.normal(jax.random.key(0), x.shape)
    labels = jnp.array([0.5, 5.0])
    params = jax.jit(lambda k: model.init({"params": k}, x, labels))(jax.random.key(1, impl="rbg"))
    # A "trained" base: the (near-)zero-initialised kernels (attention output NIN, output conv) get
    # N(0, 1/fan_in) weights, so the base output and every layer's effect on it are O(1).
    kernels = lora.kernel_paths(params)
    trained = lambda path, v: (jax.random.normal(jax.random.key(v.size), v.shape) / math.sqrt(v.size / v.shape[-1])
                               if "/".join(k.key for k in path) in kernels and float(jnp.max(jnp.abs(v))) < 1e-3 else v)
    return model, jax.tree_util.tree_map_with_path(trained, params), x, labels


def test_ncsnpp_attention_selection_and_count(ncsnpp):
    """attn_resolutions (4,) on 8×8 images with ch_mult (1, 2): one attention block on the way down,
    one in the middle, one on the way up, each with 4 NIN (C, C), C = 2·nf = 32: 12 entries, 12·r·2C."""
    _, params, _, _ = ncsnpp
    adapter = lora.init_lora(jax.random.key(0), params, 4, targets=r"NIN_\d/W$")
    entries = lora.adapter_entries(adapter)
    assert len(entries) == 12 and all(a.shape == (32, 4) for a, _ in entries.values())
    assert count_params(adapter) == 12 * 4 * 2 * 32


def test_ncsnpp_unmerged_equals_merged(ncsnpp):
    """All 54 kernels adapted (Dense, Conv, NIN, FIRConv2d). At B = 0 the unmerged network is the base
    bitwise. With random B, in float32: unmerged and merged differ by rounding only. In float64 (the
    network's dtype set to float64; NCSN++ casts its output to float32 at the end): the two agree to
    ~1e-15 relative per layer times the network's amplification (≪ 1e7), so after the final cast
    they are equal or adjacent float32 numbers: |unmerged − merged| ≤ 1 ulp₃₂(|merged|) elementwise,
    while the adapter moves the output by ≥ 10 % of max|base| (≫ 10⁵ ulp), so a wrong path, stride,
    padding or FIR order cannot pass."""
    model, params, x, labels = ncsnpp
    adapter = lora.init_lora(jax.random.key(2), params, 2)
    assert len(lora.adapter_entries(adapter)) == len(lora.kernel_paths(params)) == 54
    with jax.enable_x64(True):
        model64 = model.clone(dtype=jnp.float64)
        to64 = lambda t: jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), t)
        apply_fn = lambda p, x, labels, *, train=False, rng=None: model64.apply(p, x, labels, train=False)
        base = jax.jit(apply_fn)
        unmerged = jax.jit(lambda f, ad: f(ad, x.astype(jnp.float64), labels))
        p64, x64 = to64(params), x.astype(jnp.float64)
        f = lora.lora_apply_fn(apply_fn, p64, SCALE)
        out_base = np.asarray(base(p64, x64, labels))
        np.testing.assert_array_equal(unmerged(f, to64(adapter)), out_base)
        ad64 = to64(randomise_b(adapter, seed=5, std=0.2))
        out_unmerged = np.asarray(unmerged(f, ad64))
        out_merged = np.asarray(base(lora.merge(p64, ad64, SCALE), x64, labels))
    assert out_merged.dtype == np.float32
    assert np.all(np.abs(out_unmerged - out_merged) <= np.spacing(np.abs(out_merged)))
    assert np.max(np.abs(out_merged - out_base)) >= 0.1 * np.max(np.abs(out_base))


# --- persistence and errors -----------------------------------------------------------------------------------------
def test_save_load_round_trip_and_mismatch(tmp_path, mlp):
    """orbax round trip is bitwise; a saved rank-2 adapter loaded as rank 1, or merged into a base it
    was not made for, is a ValueError naming the path."""
    _, params, _, _ = mlp
    adapter = randomise_b(lora.init_lora(jax.random.key(0), params, 2, targets=r"Dense_[0-3]/"), seed=1)
    lora.save_adapter(tmp_path / "adapter", adapter)
    assert trees_equal(lora.load_adapter(tmp_path / "adapter", adapter), adapter)
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel/A"):
        lora.load_adapter(tmp_path / "adapter", lora.init_lora(jax.random.key(0), params, 1, targets=r"Dense_[0-3]/"))
    other = MLP(features=8, depth=1, embedding_size=E).init(jax.random.key(0), jnp.zeros((1, D)), jnp.ones(1))
    with pytest.raises(ValueError, match=r"params/Dense_0/kernel: A \(16, 2\), B \(2, 16\) do not fit the base kernel \(8, 8\)"):
        lora.merge(other, adapter, 1.0)


class OwnKernel(nn.Module):
    @nn.compact
    def __call__(self, x, labels, train=False):
        return x @ self.param("kernel", nn.initializers.ones, (x.shape[-1], 3))


def test_bad_inputs_are_named(mlp):
    _, params, x, labels = mlp
    with pytest.raises(ValueError, match=r"match no kernel; available: params/Dense_0/kernel"):
        lora.init_lora(jax.random.key(0), params, 2, targets="attention")
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        lora.init_lora(jax.random.key(0), params, 0)
    with pytest.raises(ValueError, match=rf"rank 3 exceeds min\(fan_in, out\) = min\({D}, {F}\) of params/Dense_2/kernel"):
        lora.init_lora(jax.random.key(0), params, 3)
    net = OwnKernel()
    own = net.init(jax.random.key(0), jnp.ones((1, 4)), jnp.ones(1))
    f = lora.lora_apply_fn(lambda p, x, labels, **kw: net.apply(p, x, labels), own, 1.0)
    with pytest.raises(ValueError, match=r"params/kernel: unmerged LoRA supports .*not OwnKernel; use merge"):
        f(lora.init_lora(jax.random.key(0), own, 1), jnp.ones((1, 4)), jnp.ones(1))
    assert math.isclose(lora.lora_scale(4, 8.0), 2.0) and lora.lora_scale(4) == 1.0
