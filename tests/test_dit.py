"""DiT (sdejax.models.dit) against its definitions: adaLN-Zero identity at init, patchify bijection, the
sin-cos formula, the paper's parameter counts (abstract shapes only), the null-class convention."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.models import dit, registry

TINY = dict(image_size=8, num_channels=3, patch_size=2, num_classes=5, shape=(2, 32, 4))
X = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
LABELS = jnp.array([3.0, 700.0])
Y = jnp.array([1, 4], jnp.int32)
MODEL = dit.DiT(**TINY)
VARIABLES = MODEL.init(jax.random.PRNGKey(1), X, LABELS, y=Y)
APPLY = jax.jit(lambda v, y: MODEL.apply(v, X, LABELS, y=y))  # compiled once per y-is-None


def _perturb(variables, key):
    """Every parameter (the zero-initialised adaLN and final Dense included) replaced by N(0, 0.1²)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("p", [2, 4, 8])
def test_patchify_round_trip_bitwise(p):
    """unpatchify ∘ patchify is a permutation of entries and its inverse: equality is exact; patch (0, 1)
    is x[:, 0:p, p:2p] flattened (the definition of row-major patch order)."""
    x = jax.random.normal(jax.random.PRNGKey(p), (2, 16, 24, 3))
    tokens = dit.patchify(x, p)
    assert tokens.shape == (2, (16 // p) * (24 // p), p * p * 3)
    np.testing.assert_array_equal(tokens[:, 1], x[:, :p, p:2 * p].reshape(2, -1))
    np.testing.assert_array_equal(dit.unpatchify(tokens, p, 16, 24), x)


def test_patchify_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="x.shape"):
        dit.patchify(jnp.zeros((1, 10, 8, 3)), 4)
    with pytest.raises(ValueError, match="patch_size"):
        dit.patchify(jnp.zeros((1, 8, 8, 3)), 3)


def test_sincos_pos_embed_matches_definition():
    """E[(i, j), k] = sin(j ω_k) for k < D/4, cos(j ω_{k−D/4}) for k < D/2, then the same with i;
    ω_k = 10⁴^(−4k/D); float64 numpy on both sides, so 1e-12 is rounding only."""
    d, gh, gw = 16, 3, 5
    emb = dit.sincos_2d(d, gh, gw)
    omega = 10000.0 ** (-np.arange(d // 4) / (d // 4))
    for i in range(gh):
        for j in range(gw):
            ref = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
            np.testing.assert_allclose(emb[i * gw + j], ref, atol=1e-12)


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    """α₁ = α₂ = 0 exactly at init, so h + 0·f(h) = h in floating point (f finite); the final Dense is 0."""
    block = dit.DiTBlock(32, 4)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 32))
    c = jax.random.normal(jax.random.PRNGKey(3), (2, 32))
    params = block.init(jax.random.PRNGKey(4), h, c)
    np.testing.assert_array_equal(block.apply(params, h, c), h)
    out = APPLY(VARIABLES, Y)
    assert out.shape == X.shape
    np.testing.assert_array_equal(out, jnp.zeros_like(X))


def test_class_conditioning_and_null_class():
    """At init the output is 0 whatever y is; once the adaLN weights are nonzero, y changes the output, and
    y=None equals the explicit null class y = num_classes (same computation: equality is exact)."""
    np.testing.assert_array_equal(APPLY(VARIABLES, Y), APPLY(VARIABLES, Y[::-1]))
    params = _perturb(VARIABLES, jax.random.PRNGKey(5))
    a, b = APPLY(params, Y), APPLY(params, Y[::-1])
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    null = jnp.full((2,), TINY["num_classes"], jnp.int32)
    np.testing.assert_array_equal(APPLY(params, None), APPLY(params, null))


def test_registry_builds_dit_and_apply_fn_convention():
    """`model.name = 'dit'` builds the DiT; make_apply_fn's apply_fn(params, x, labels, y=...) is module.apply
    (eager vs jitted: XLA may fuse/reorder float32 ops, a few ulps of O(1) outputs, hence 1e-6)."""
    from configs.dit.cifar10_dit import get_config
    config = get_config()
    config.data.image_size, config.model.patch_size = 8, 4
    model = registry.get_model(config)
    assert isinstance(model, dit.DiT) and model.size == "S" and model.patch_size == 4
    apply_fn = registry.make_apply_fn(MODEL)
    params = _perturb(VARIABLES, jax.random.PRNGKey(6))
    np.testing.assert_allclose(apply_fn(params, X, LABELS, y=Y), APPLY(params, Y), rtol=1e-6, atol=1e-6)


def test_config_shape_overrides_the_size():
    """`model.shape = (depth, hidden, heads)` builds that DiT (configs/digits_dit.py: 4 blocks of width 128);
    a malformed shape names the key. Parameters (eval_shape) against a hand count, D = 128, p²C = 4: patch
    embedding p²C·D + D, time embedding 256·D + D + D² + D, per block 18D² + 15D (q, k, v, out 4D² + 4D;
    MLP 8D² + 5D; adaLN 6D² + 6D), final layer 2D² + 2D (adaLN) + D·p²C + p²C."""
    from configs import digits_dit
    config = digits_dit.get_config()
    model = registry.get_model(config)
    assert model.dims == (4, 128, 4)
    d, pc = 128, 4
    expected = (pc * d + d) + (256 * d + d + d * d + d) + 4 * (18 * d * d + 15 * d) + (2 * d * d + 2 * d + d * pc + pc)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,))))
    assert registry.count_params(shapes) == expected
    for bad in ((6, 128), (6, 130, 4), (0, 128, 4)):
        config.model.shape = bad
        with pytest.raises(ValueError, match=re.escape("model.shape must be (depth, hidden_size, num_heads)")):
            registry.get_model(config)


# Peebles & Xie, 256² ImageNet (latent 32×32×4, 1000 classes + null, learned σ: 8 output channels); the
# official code's count includes the fixed sin-cos position embedding (a frozen nn.Parameter, T·D).
PAPER_COUNTS = {"S": 32_963_360, "B": 130_512_416, "L": 458_102_816, "XL": 675_129_632}


@pytest.mark.parametrize("size", sorted(dit.SIZES))
def test_parameter_counts_match_paper(size):
    """Trainable count (abstract shapes via eval_shape) + the T·D fixed position embedding = the published
    count exactly (33.0, 130.3, 458.1, 675.1 M)."""
    model = dit.DiT(32, 4, size=size, patch_size=2, learn_sigma=True, num_classes=1000)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4)), jnp.ones((1,)),
                                                 y=jnp.zeros((1,), jnp.int32)), jax.random.PRNGKey(0))
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n_trainable + 256 * dit.SIZES[size][1] == PAPER_COUNTS[size]


def test_shipped_latent_dit_config_is_dit_xl2_on_f8_latents():
    """configs/dit/imagenet256_latent_dit_xl2.py: a latent run whose network sees the f = 8 autoencoder's
    32×32×4 latents of 256² images and is DiT-XL/2 with 1000 classes: the paper's count less the fixed position
    embedding (256·1152) and less learned σ's 4 extra output channels (1152·2²·4 + 2²·4 = 18,448)."""
    from configs.dit import imagenet256_latent_dit_xl2
    from sdejax.training import config as config_lib, latent

    config = imagenet256_latent_dit_xl2.get_config()
    config_lib.check_config(config)
    net = latent.network_config(config)
    assert (net.data.image_size, net.data.num_channels) == (32, 4) and config.data.image_size == 256
    model = registry.get_model(net)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 4)), jnp.ones((1,)),
                                                 y=jnp.zeros((1,), jnp.int32)), jax.random.PRNGKey(0))
    assert registry.count_params(shapes) == PAPER_COUNTS["XL"] - 256 * 1152 - (1152 * 16 + 16)
