"""ControlNet oracles on three tiny class-conditional bases (batch 2, one channel): a DDPM U-Net (nf 32:
GroupNorm(32) needs 32 channels; ch_mult (1, 2), 1 res block, 16×16), an NCSN++ as in tiny/ncsnpp_ve
(Fourier embedding with its frozen W, FIR, BigGAN blocks, residual input pyramid; nf 16, 8×8) and a
DiT/2 (depth 4, hidden 32, 8×8; 2 copied blocks). Zero projections make the augmented network the base
bit for bit for any control image; only the ControlNet side trains; the residuals reach the output
once the zero projections are non-zero; score functions, CFG and DDIM run through it unchanged."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdejax import guidance, losses
from sdejax.models.controlnet import ControlNet, ControlNetParams, controlnet_apply_fn, init_controlnet
from sdejax.models.ddpm import DDPM
from sdejax.models.dit import DiT
from sdejax.models.ncsnpp import NCSNpp
from sdejax.models.registry import count_params, make_apply_fn
from sdejax.sampling.ddim import ddim_sample
from sdejax.score import get_score_fn
from sdejax.sde import VPSDE

B = 2
NCSNPP_TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=8, num_channels=1,
                   dropout=0.0, num_classes=2)
BASES = {  # name: (base module, ControlNet kwargs, number of zero projections)
    "ddpm": (DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16, num_channels=1,
                  dropout=0.0, num_classes=2), {}, 1 + 2 + 1 + 1),  # conv_in, 2 res blocks, downsample, middle
    "ncsnpp": (NCSNpp(**NCSNPP_TINY), {}, 1 + 2 + 1 + 1),
    "dit": (DiT(image_size=8, num_channels=1, patch_size=2, num_classes=2, shape=(4, 32, 4)), {}, 2),
}
SDE_ = VPSDE()


def random_like(shapes, seed: int, std: float = 1.0):
    """A tree of N(0, std²/fan_in)-scaled leaves shaped like `shapes` (numpy: no slow XLA RNG compiles)."""
    rng = np.random.default_rng(seed)
    fan = lambda s: math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1  # noqa: E731
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, std / math.sqrt(fan(s)), s.shape), s.dtype), shapes)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def zero_names(control) -> list[str]:
    return [k for k in control["params"] if k.startswith("zero_")]


def perturb(control, names, seed: int):
    """`control` with the params under the top-level `names` (or "hint/zero_conv") redrawn at random."""
    params = dict(control["params"])
    for i, name in enumerate(names):
        if name == "hint/zero_conv":
            params["hint"] = {**params["hint"], "zero_conv": random_like(params["hint"]["zero_conv"], seed + i)}
        else:
            params[name] = random_like(params[name], seed + i)
    return {"params": params}


@pytest.fixture(scope="module", params=sorted(BASES))
def case(request):
    """One base with random (non-zero everywhere) params, its ControlNet at init and jitted forwards."""
    base_net, kwargs, n_zero = BASES[request.param]
    size = base_net.image_size
    x = jax.random.normal(jax.random.PRNGKey(0), (B, size, size, 1))
    labels, y = jnp.array([10.0, 700.0]), jnp.array([0, 1])
    base = random_like(jax.eval_shape(lambda: base_net.init(jax.random.PRNGKey(0), x, labels, y=y)), 1)
    images = [jax.random.uniform(jax.random.PRNGKey(k), (B, size, size, 3)) for k in (2, 3)]
    net = ControlNet(base_net, hint_channels=(8, 16), **kwargs)
    control = init_controlnet(jax.random.key(4, impl="rbg"), net, base, x, labels, images[0], y=y)
    apply, base_apply = controlnet_apply_fn(net), make_apply_fn(base_net)
    controlled = jax.jit(lambda control, image: apply(ControlNetParams(base, control, image), x, labels, y=y))
    plain = np.asarray(jax.jit(lambda: base_apply(base, x, labels, y=y))())
    return dict(name=request.param, base_net=base_net, net=net, n_zero=n_zero, x=x, labels=labels, y=y,
                base=base, images=images, control=control, apply=apply, base_apply=base_apply,
                controlled=controlled, plain=plain)


def test_at_init_the_output_is_the_base_bitwise_for_any_control_image(case):
    assert np.abs(case["plain"]).max() > 1e-3  # the base's own output is not trivially zero
    for image in (*case["images"], 100.0 * jnp.ones_like(case["images"][0])):
        np.testing.assert_array_equal(np.asarray(case["controlled"](case["control"], image)), case["plain"])


def test_copy_starts_as_the_base_by_key_and_parameter_counts(case):
    s = case
    base, params = s["base"]["params"], s["control"]["params"]
    copy = params["copy"]
    assert set(copy) < set(base) and "class_embed" in copy
    for k in copy:
        assert leaves_equal(copy[k], base[k]), k
    assert len(zero_names(s["control"])) == s["n_zero"]
    for tree in [params[k] for k in zero_names(s["control"])] + [params["hint"]["zero_conv"]]:
        assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(tree))
    shapes = jax.eval_shape(lambda: s["net"].init(jax.random.PRNGKey(0), s["x"], s["labels"], s["images"][0],
                                                  y=s["y"]))["params"]
    assert count_params(shapes["copy"]) == count_params(copy) < count_params(base)
    assert count_params(shapes) == count_params(s["control"])


def test_dit_copies_the_first_num_blocks_blocks():
    """The DiT copy holds the embeddings and blocks 0..N−1 (N = depth // 2 by default, or num_blocks)."""
    base_net = BASES["dit"][0]
    x, labels, image = jnp.zeros((B, 8, 8, 1)), jnp.ones((B,)), jnp.zeros((B, 8, 8, 3))
    for n, blocks in ((None, 2), (1, 1), (4, 4)):
        shapes = jax.eval_shape(lambda: ControlNet(base_net, (8,), num_blocks=n).init(
            jax.random.PRNGKey(0), x, labels, image))["params"]
        assert sorted(k for k in shapes["copy"] if k.startswith("block_")) == [f"block_{i}" for i in range(blocks)]
        assert len([k for k in shapes if k.startswith("zero_")]) == blocks
        assert shapes["hint"]["zero_conv"]["kernel"].shape == (2, 2, 8, 32)  # patchify + Dense to hidden


@pytest.mark.parametrize("variant", [
    dict(progressive="output_skip", resblock_type="ddpm", progressive_input="none"),
    dict(progressive="residual", progressive_input="input_skip", progressive_combine="cat", fir=False),
    dict(embedding_type="positional", fir=False, progressive_input="none", scale_by_sigma=False),
])
def test_ncsnpp_variants_take_one_residual_per_skip(variant):
    """Every NCSN++ pyramid/resampling variant: the ControlNet's residuals match the copy's (hs, h_mid)
    one for one (shapes, abstractly) and the base takes them; a residual list of the wrong length fails."""
    base_net = NCSNpp(**{**NCSNPP_TINY, **variant})
    x, labels, image = jnp.zeros((B, 8, 8, 1)), jnp.ones((B,)), jnp.zeros((B, 8, 8, 3))
    variables = jax.eval_shape(lambda: base_net.init(jax.random.PRNGKey(0), x, labels))
    net = ControlNet(base_net, (8,))
    cn_vars = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, labels, image))
    residuals = jax.eval_shape(lambda v: net.apply(v, x, labels, image), cn_vars)
    hs, h_mid = jax.eval_shape(lambda v: base_net.apply(v, x, labels, features_only=True), variables)
    assert [r.shape for r in residuals] == [f.shape for f in [*hs, h_mid]]
    out = jax.eval_shape(lambda v, r: base_net.apply(v, x, labels, control=r), variables, residuals)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="control must hold"):
        jax.eval_shape(lambda v, r: base_net.apply(v, x, labels, control=r[:-1]), variables, residuals)


def test_bad_bases_and_arguments_are_reported():
    x, labels, image = jnp.zeros((B, 8, 8, 1)), jnp.ones((B,)), jnp.zeros((B, 8, 8, 3))
    init = lambda net: jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, labels, image))  # noqa: E731
    with pytest.raises(ValueError, match="no base Dense; valid: .*DiT"):
        init(ControlNet(nn.Dense(1)))
    with pytest.raises(ValueError, match="num_blocks"):
        init(ControlNet(NCSNpp(**NCSNPP_TINY), num_blocks=2))
    with pytest.raises(ValueError, match="num_blocks"):
        init(ControlNet(BASES["dit"][0], num_blocks=5))
    with pytest.raises(ValueError, match="control image"):
        jax.eval_shape(lambda: ControlNet(BASES["dit"][0]).init(jax.random.PRNGKey(0), x, labels, image[:, :4]))
    dit_vars = jax.eval_shape(lambda: BASES["dit"][0].init(jax.random.PRNGKey(0), x, labels))
    with pytest.raises(ValueError, match="depth 4"):
        jax.eval_shape(lambda v: BASES["dit"][0].apply(v, x, labels, control=[jnp.zeros((B, 16, 32))] * 5), dit_vars)


def test_one_adam_step_trains_only_the_controlnet_side(case):
    s = case
    loss_fn = losses.get_sde_loss_fn(SDE_, s["apply"], train=True, num_classes=2, p_uncond=0.2)
    batch = {"x": jax.random.normal(jax.random.PRNGKey(5), s["x"].shape), "y": s["y"], "control": s["images"][0]}
    opt = optax.adam(1e-2)

    def loss(base, control, rng, batch):
        return loss_fn(ControlNetParams(base, control, batch["control"]), rng, batch)[0]

    @jax.jit
    def step(base, control, opt_state, rng):
        value, (g_base, g_control) = jax.value_and_grad(loss, argnums=(0, 1))(base, control, rng, batch)
        updates, opt_state = opt.update(g_control, opt_state, control)
        return optax.apply_updates(control, updates), opt_state, value, g_base

    base_before = jax.tree_util.tree_map(np.array, s["base"])
    control, opt_state = s["control"], opt.init(s["control"])
    history = []
    for k in range(3):
        control, opt_state, value, g_base = step(s["base"], control, opt_state, jax.random.key(10 + k, impl="rbg"))
        assert np.isfinite(value)
        assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(g_base))
        history.append(control["params"])
    assert leaves_equal(s["base"], base_before)
    init = s["control"]["params"]

    def changed(after, name):
        return not leaves_equal(after[name], init[name])

    # Step 1: only the zero projections get gradient (the copy and hint sit behind zero kernels) ...
    assert all(changed(history[0], k) for k in zero_names(s["control"]))
    assert not changed(history[0], "copy") and not changed(history[0], "hint")
    # ... and after three steps every part of the ControlNet has moved.
    assert changed(history[2], "copy") and all(
        not leaves_equal(history[2]["hint"][k], init["hint"][k]) for k in init["hint"])


def test_non_zero_projections_add_a_residual_that_depends_on_the_control_image(case):
    s = case
    zeros = zero_names(s["control"])
    # Zero projections non-zero, the hint's zero conv still zero: a residual, but blind to the image.
    blind = perturb(s["control"], zeros, 20)
    a, b = (np.asarray(s["controlled"](blind, im)) for im in s["images"])
    assert np.abs(a - s["plain"]).max() > 1e-3
    np.testing.assert_array_equal(a, b)
    # With the hint's zero conv non-zero too, two control images give two outputs.
    seeing = perturb(s["control"], [*zeros, "hint/zero_conv"], 20)
    a, b = (np.asarray(s["controlled"](seeing, im)) for im in s["images"])
    assert np.abs(a - s["plain"]).max() > 1e-3 and np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("case", ["ddpm", "dit"], indirect=True)  # NCSN++: as ddpm, ~7 s more compile
def test_cfg_ddim_through_the_controlnet_equals_the_base_at_init(case):
    s = case
    w = 1.5
    sample = jax.jit(lambda score, key: ddim_sample(key, SDE_, score, s["x"].shape, num_steps=3, denoise=False)[0])

    def cfg(apply_fn, params):
        return guidance.cfg(SDE_, get_score_fn(SDE_, apply_fn, params, y=s["y"]), get_score_fn(SDE_, apply_fn, params), w)

    key = jax.random.key(7, impl="rbg")
    ref = np.asarray(sample(cfg(s["base_apply"], s["base"]), key))
    out = np.asarray(sample(cfg(s["apply"], ControlNetParams(s["base"], s["control"], s["images"][0])), key))
    assert np.all(np.isfinite(ref))
    np.testing.assert_array_equal(out, ref)
    # A trained-looking ControlNet reuses the compiled sampler (same pytree) and steers the samples.
    steered = perturb(s["control"], [*zero_names(s["control"]), "hint/zero_conv"], 30)
    moved = np.asarray(sample(cfg(s["apply"], ControlNetParams(s["base"], steered, s["images"][0])), key))
    assert np.all(np.isfinite(moved)) and np.abs(moved - ref).max() > 1e-3
