"""ControlNet oracles on a tiny class-conditional DDPM U-Net (nf 32: GroupNorm(32) needs 32 channels;
ch_mult (1, 2), 1 res block, 16×16×1, batch 2): zero convs make the augmented network the base bit
for bit for any control image; only the ControlNet side trains; the residuals reach the output once
the zero convs are non-zero; score functions, CFG and DDIM run through it unchanged."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdejax import guidance, losses
from sdejax.models.controlnet import ControlNet, ControlNetParams, controlnet_apply_fn, init_controlnet
from sdejax.models.ddpm import DDPM
from sdejax.models.registry import count_params, make_apply_fn
from sdejax.sampling.ddim import ddim_sample
from sdejax.score import get_score_fn
from sdejax.sde import VPSDE

B, SIZE = 2, 16
UNET = DDPM(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=SIZE, num_channels=1,
            dropout=0.0, num_classes=2)
NET = ControlNet(UNET, hint_channels=(8, 16))
SDE_ = VPSDE()


def random_like(shapes, seed: int, std: float = 1.0):
    """A tree of N(0, std²/fan_in)-scaled leaves shaped like `shapes` (numpy: no slow XLA RNG compiles)."""
    rng = np.random.default_rng(seed)
    fan = lambda s: math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1  # noqa: E731
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0.0, std / math.sqrt(fan(s)), s.shape), s.dtype), shapes)


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def perturb(control, names, seed: int):
    """`control` with the params under the top-level `names` (or "hint/zero_conv") redrawn at random."""
    params = dict(control["params"])
    for i, name in enumerate(names):
        if name == "hint/zero_conv":
            params["hint"] = {**params["hint"], "zero_conv": random_like(params["hint"]["zero_conv"], seed + i)}
        else:
            params[name] = random_like(params[name], seed + i)
    return {"params": params}


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, SIZE, SIZE, 1))
    labels = jnp.array([10.0, 700.0])
    y = jnp.array([0, 1])
    base = random_like(jax.eval_shape(lambda: UNET.init(jax.random.PRNGKey(0), x, labels, y=y)), 1)
    images = [jax.random.uniform(jax.random.PRNGKey(k), (B, SIZE, SIZE, 3)) for k in (2, 3)]
    control = init_controlnet(jax.random.PRNGKey(4), NET, base, x, labels, images[0], y=y)
    return dict(x=x, labels=labels, y=y, base=base, images=images, control=control)


APPLY = controlnet_apply_fn(NET)
BASE_APPLY = make_apply_fn(UNET)
controlled = jax.jit(lambda base, control, image, x, labels, y: APPLY(ControlNetParams(base, control, image),
                                                                     x, labels, y=y))
plain = jax.jit(lambda base, x, labels, y: BASE_APPLY(base, x, labels, y=y))


def test_at_init_the_output_is_the_base_bitwise_for_any_control_image(setup):
    s = setup
    ref = np.asarray(plain(s["base"], s["x"], s["labels"], s["y"]))
    for image in (*s["images"], 100.0 * jnp.ones_like(s["images"][0])):
        out = controlled(s["base"], s["control"], image, s["x"], s["labels"], s["y"])
        np.testing.assert_array_equal(np.asarray(out), ref)


def test_copy_starts_as_the_base_encoder_and_parameter_counts(setup):
    base, params = setup["base"]["params"], setup["control"]["params"]
    copy = params["copy"]
    assert set(copy) < set(base) and "class_embed" in copy
    for k in copy:
        assert leaves_equal(copy[k], base[k]), k
    zeros = [k for k in params if k.startswith("zero_")]
    assert len(zeros) == 1 + 2 + 1 + 1  # conv_in, 2 res blocks, 1 downsample, middle block
    for tree in [params[k] for k in zeros] + [params["hint"]["zero_conv"]]:
        assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(tree))
    # the copy's encoder output is the base's (the hint is zero at init)
    feats = jax.jit(lambda v, x, l, y: UNET.apply(v, x, l, y=y, features_only=True))
    s = setup
    assert leaves_equal(feats({"params": copy}, s["x"], s["labels"], s["y"]),
                        feats(s["base"], s["x"], s["labels"], s["y"]))
    shapes = jax.eval_shape(lambda: NET.init(jax.random.PRNGKey(0), s["x"], s["labels"], s["images"][0], y=s["y"]))
    assert count_params(shapes["params"]["copy"]) == count_params(copy) < count_params(base)
    assert count_params(shapes) == count_params(setup["control"])


def test_one_adam_step_trains_only_the_controlnet_side(setup):
    s = setup
    loss_fn = losses.get_sde_loss_fn(SDE_, APPLY, train=True, num_classes=2, p_uncond=0.2)
    batch = {"x": jax.random.normal(jax.random.PRNGKey(5), (B, SIZE, SIZE, 1)), "y": s["y"],
             "control": s["images"][0]}
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
        control, opt_state, value, g_base = step(s["base"], control, opt_state, jax.random.PRNGKey(10 + k))
        assert np.isfinite(value)
        assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(g_base))
        history.append(control["params"])
    assert leaves_equal(s["base"], base_before)
    init = s["control"]["params"]

    def changed(after, name):
        return not leaves_equal(after[name], init[name])

    zeros = [k for k in init if k.startswith("zero_")]
    # Step 1: only the zero projections get gradient (the copy and hint sit behind zero kernels) ...
    assert all(changed(history[0], k) for k in zeros)
    assert not changed(history[0], "copy") and not changed(history[0], "hint")
    # ... and after three steps every part of the ControlNet has moved.
    assert changed(history[2], "copy") and all(
        not leaves_equal(history[2]["hint"][k], init["hint"][k]) for k in init["hint"])


def test_non_zero_convs_add_a_residual_that_depends_on_the_control_image(setup):
    s = setup
    ref = np.asarray(plain(s["base"], s["x"], s["labels"], s["y"]))
    zeros = [k for k in s["control"]["params"] if k.startswith("zero_")]
    # Zero projections non-zero, the hint's zero conv still zero: a residual, but blind to the image.
    blind = perturb(s["control"], zeros, 20)
    a, b = (np.asarray(controlled(s["base"], blind, im, s["x"], s["labels"], s["y"])) for im in s["images"])
    assert np.abs(a - ref).max() > 1e-3
    np.testing.assert_array_equal(a, b)
    # With the hint's zero conv non-zero too, two control images give two outputs.
    seeing = perturb(s["control"], [*zeros, "hint/zero_conv"], 20)
    a, b = (np.asarray(controlled(s["base"], seeing, im, s["x"], s["labels"], s["y"])) for im in s["images"])
    assert np.abs(a - ref).max() > 1e-3 and np.abs(a - b).max() > 1e-4


def test_cfg_ddim_through_the_controlnet_equals_the_base_at_init(setup):
    s = setup
    shape, w = (B, SIZE, SIZE, 1), 1.5
    sample = jax.jit(lambda score, key: ddim_sample(key, SDE_, score, shape, num_steps=3)[0])

    def cfg(apply_fn, params):
        return guidance.cfg(SDE_, get_score_fn(SDE_, apply_fn, params, y=s["y"]), get_score_fn(SDE_, apply_fn, params), w)

    key = jax.random.PRNGKey(7)
    ref = np.asarray(sample(cfg(BASE_APPLY, s["base"]), key))
    out = np.asarray(sample(cfg(APPLY, ControlNetParams(s["base"], s["control"], s["images"][0])), key))
    assert np.all(np.isfinite(ref))
    np.testing.assert_array_equal(out, ref)
    # A trained-looking ControlNet reuses the compiled sampler (same pytree) and steers the samples.
    zeros = [k for k in s["control"]["params"] if k.startswith("zero_")]
    steered = perturb(s["control"], [*zeros, "hint/zero_conv"], 30)
    moved = np.asarray(sample(cfg(APPLY, ControlNetParams(s["base"], steered, s["images"][0])), key))
    assert np.all(np.isfinite(moved)) and np.abs(moved - ref).max() > 1e-3
