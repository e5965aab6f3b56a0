"""score_sde's original Flax checkpoints load into sdejax's networks.

Oracles: the original code's own outputs and scores on fixed inputs, and its per-leaf sha256
(`tests/fixtures/reference_flax`, made by running score_sde); the configurations those networks
were built from; for layouts no fixture has (the released CIFAR-10 NCSN++'s residual input
pyramid with FIR resampling convs, ...), trees named as score_sde's modules name their parameters,
written out here from its code (models/ncsnpp.py, layerspp.py, layers.py, ddpm.py, ncsnv2.py);
and for the FIR conv's weight layout, the original's formula (a transposed convolution).
"""
import collections
import copy
import hashlib
import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from sdejax import sde as sde_lib
from sdejax.models import get_model, make_apply_fn, up_down
from sdejax.models.convert_flax import (expected_leaves, from_flax_params, load_flax_checkpoint,
                                        read_flax_checkpoint)
from sdejax.models.registry import dummy_inputs
from sdejax.score import get_score_fn

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ["ncsnpp_ve_fourier_fir_skip", "ddpmpp_vp_continuous", "ddpm_vp_discrete", "ncsnv2_ve"]
SDE_KEYS = {"vesde": ("sigma_min", "sigma_max"), "vpsde": ("beta_min", "beta_max")}
RTOL = 1e-5


def rel_err(a, b) -> float:
    """max|a - b| / max|b| over the whole array (the fixture README's measure)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def load_config(name: str, overrides: dict) -> ml_collections.ConfigDict:
    """sdejax's `configs/<name>.py` with dotted-key overrides (lists become tuples)."""
    config = importlib.import_module("configs." + name.replace("/", ".")).get_config()
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = tuple(value) if isinstance(value, list) else value
    return config


class Fixture:
    """One folder of `reference_flax`: its sidecar, original config, arrays and checkpoint file."""

    def __init__(self, root: pathlib.Path, name: str):
        folder = root / "reference_flax" / name
        self.meta = json.loads((folder / "meta.json").read_text())
        self.original_config = json.loads((folder / "config.json").read_text())
        with np.load(folder / "io.npz") as data:
            self.io = {k: data[k] for k in data.files}
        self.checkpoint = folder / "checkpoints" / f"checkpoint_{self.meta['checkpoint']['file_index']}"

    def config(self) -> ml_collections.ConfigDict:
        """The same network from sdejax's copy of the base config (NCSNv2 in its Flax flavour)."""
        config = load_config(self.meta["base_config"].removeprefix("configs/").removesuffix(".py"),
                             self.meta["overrides"])
        if config.model.name.startswith("ncsnv2"):
            config.model.flavor = "flax"
        return config


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request, fixtures_dir) -> Fixture:
    return Fixture(fixtures_dir, request.param)


# Fields the original reads that sdejax's networks do not (one behaviour, built in, so the configs no
# longer carry them): the original's value must be that behaviour.
BUILT_IN = {("ddpm", "model.normalization"): "GroupNorm", ("ncsnv2_64", "model.normalization"): "InstanceNorm++",
            ("ncsnv2_64", "model.interpolation"): "bilinear",
            ("ncsnv2_64", "model.scale_by_sigma"): True}  # NCSNv2 always divides its output by σ


def test_sdejax_configs_are_the_originals(fixture):
    """Every config field the original network and score function read has the original's value (or,
    where sdejax's network has it built in, the original's value is the built-in one)."""
    config, original = fixture.config(), fixture.original_config
    for field in fixture.meta["model_fields_read"] + fixture.meta["score_fields_read"]:
        section, key = field.split(".")
        if key not in config[section]:
            assert original[section][key] == BUILT_IN[(config.model.name, field)], field
            continue
        ours, theirs = config[section][key], original[section][key]
        assert (list(ours) if isinstance(ours, tuple) else ours) == theirs, field


def test_checkpoint_reproduces_the_original_outputs(fixture):
    """params_ema (and, with tree="params", optimizer.target) give the original's raw outputs and
    scores on every recorded path and time, within 1e-5 relative."""
    config, io = fixture.config(), fixture.io
    apply_fn = jax.jit(make_apply_fn(get_model(config)), static_argnames=("train",))
    kw = {k: float(config.model[k]) for k in SDE_KEYS[fixture.meta["sde"]["kind"]]}
    sde = sde_lib.get_sde(fixture.meta["sde"]["kind"], N=fixture.meta["sde"]["N"], **kw)
    trees = {tree: load_flax_checkpoint(fixture.checkpoint, config, tree=tree) for tree in ("params_ema", "params")}
    x = jnp.asarray(io["input/x"])
    errors = {}
    for path in fixture.meta["paths"]:
        for tn in ("t0", "t1"):
            labels = jnp.asarray(io[f"input/labels_{path}_{tn}"])
            for tree, variables in trees.items():
                errors[f"{tree} {path} {tn}"] = rel_err(apply_fn(variables, x, labels),
                                                        io[f"output/model_{tree}_{path}_{tn}"])
            score_fn = get_score_fn(sde, apply_fn, trees["params_ema"], continuous=path == "continuous")
            errors[f"score {path} {tn}"] = rel_err(score_fn(x, jnp.asarray(io[f"input/{tn}"])),
                                                   io[f"output/score_{path}_{tn}"])
    assert max(errors.values()) <= RTOL, errors


def test_every_leaf_is_bit_exact(fixture):
    """Each loaded leaf has the bytes the original recorded (sha256 prefix per original path)."""
    config = fixture.config()
    variables = traverse_util.flatten_dict(load_flax_checkpoint(fixture.checkpoint, config))
    expected = expected_leaves(get_model(config), config)
    records = fixture.meta["checkpoint"]["params_ema_leaves"]
    assert len(records) == len(variables) == fixture.meta["checkpoint"]["n_param_leaves"]
    for record in records:
        path, digest = record.split(" ", 1)[0], record.rsplit(" ", 1)[1]
        leaf = np.ascontiguousarray(variables[expected[path][0]])
        assert hashlib.sha256(leaf.tobytes()).hexdigest()[:16] == digest, path


def test_reads_the_training_state(fixture):
    state = read_flax_checkpoint(fixture.checkpoint.parent)  # a folder: its newest checkpoint_<k>
    assert int(state["step"]) == fixture.meta["checkpoint"]["state_step"]
    with pytest.raises(FileNotFoundError, match="present"):
        read_flax_checkpoint(fixture.checkpoint.parent, step=fixture.meta["checkpoint"]["file_index"] + 1)


# ---- refusals -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpmpp(fixtures_dir) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, the original params_ema) of the smallest fixture."""
    fix = Fixture(fixtures_dir, "ddpmpp_vp_continuous")
    return fix.config(), read_flax_checkpoint(fix.checkpoint)["params_ema"]


def test_unknown_module_is_refused_with_the_nearest_names(ddpmpp):
    config, params = ddpmpp
    params = copy.deepcopy(params)
    params["AttnBlockpp_7"] = params.pop("AttnBlockpp_2")
    with pytest.raises(ValueError) as err:
        from_flax_params(params, config)
    message = str(err.value)
    assert "unknown AttnBlockpp_7/NIN_0/W (nearest expected: AttnBlockpp_" in message
    assert "missing AttnBlockpp_2/NIN_0/W" in message


def test_wrong_shape_is_refused(ddpmpp):
    config, params = ddpmpp
    params = copy.deepcopy(params)
    params["Conv_0"]["kernel"] = np.zeros((3, 3, 3, 9), np.float32)
    with pytest.raises(ValueError, match=r"wrong shape Conv_0/kernel: \(3, 3, 3, 9\), expected \(3, 3, 3, 8\)"):
        from_flax_params(params, config)


def test_group_norm_shapes(ddpmpp):
    """flax 0.3.x's (1, 1, 1, C) and later flax's (C,) load alike; other shapes are refused."""
    config, params = ddpmpp
    squeezed = copy.deepcopy(params)
    squeezed["GroupNorm_0"] = {k: v.reshape(-1) for k, v in squeezed["GroupNorm_0"].items()}
    assert params["GroupNorm_0"]["scale"].shape == (1, 1, 1, 8)
    a, b = (traverse_util.flatten_dict(from_flax_params(p, config)) for p in (params, squeezed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    squeezed["GroupNorm_0"]["scale"] = squeezed["GroupNorm_0"]["scale"].reshape(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"wrong shape GroupNorm_0/scale: \(1, 1, 2, 4\)"):
        from_flax_params(squeezed, config)


def test_networks_without_a_flax_original_are_refused(ddpmpp):
    config, params = ddpmpp
    ncsnv2 = load_config("ve/ncsnv2/cifar10", {"data.image_size": 16, "model.nf": 6})
    with pytest.raises(ValueError, match="model.flavor = 'flax'"):
        from_flax_params({}, ncsnv2)
    with pytest.raises(ValueError, match=r"Flax NCSN \(v1\) cannot be built"):
        from_flax_params({}, load_config("tiny/ncsn_ve", {}))
    conditional = copy.deepcopy(config)
    conditional.model.num_classes = 10
    with pytest.raises(ValueError, match="class_embed .*no counterpart"):
        from_flax_params(params, conditional)


# ---- layouts no fixture has: trees named as score_sde names them ----------------------------

class Scope:
    """A module of the original code: Flax names its submodules `<Class>_<k>` in creation order."""

    def __init__(self, leaves: dict, path: tuple = ()):
        self.leaves, self.path, self.counts = leaves, path, collections.Counter()

    def child(self, cls: str) -> "Scope":
        self.counts[cls] += 1
        return Scope(self.leaves, self.path + (f"{cls}_{self.counts[cls] - 1}",))

    def param(self, name: str, *shape: int) -> None:
        self.leaves["/".join(self.path + (name,))] = shape


def conv(s: Scope, cin: int, cout: int, k: int = 3, bias: bool = True) -> None:
    c = s.child("Conv")
    c.param("kernel", k, k, cin, cout)
    if bias:
        c.param("bias", cout)


def dense(s: Scope, cin: int, cout: int) -> None:
    d = s.child("Dense")
    d.param("kernel", cin, cout)
    d.param("bias", cout)


def norm(s: Scope, cls: str, c: int) -> None:
    """GroupNorm (scale, bias) or InstanceNorm2dPlus (alpha, gamma, beta), flax 0.3.x shapes."""
    n = s.child(cls)
    for leaf in ("scale", "bias") if cls == "GroupNorm" else ("alpha", "gamma", "beta"):
        n.param(leaf, 1, 1, 1, c)


def nin(s: Scope, cin: int, cout: int) -> None:
    n = s.child("NIN")
    n.param("W", cin, cout)
    n.param("b", cout)


def attn(s: Scope, cls: str, c: int) -> None:
    a = s.child(cls)
    norm(a, "GroupNorm", c)
    for _ in range(4):
        nin(a, c, c)


def resnet(s: Scope, cls: str, cin: int, cout: int, temb: int, resamples: bool = False) -> None:
    """ResnetBlockDDPM(pp) (NIN shortcut) or ResnetBlockBigGANpp (1x1 conv shortcut, also when resampling)."""
    r = s.child(cls)
    norm(r, "GroupNorm", cin)
    conv(r, cin, cout)
    if temb:
        dense(r, temb, cout)
    norm(r, "GroupNorm", cout)
    r.child("Dropout")
    conv(r, cout, cout)
    if cls == "ResnetBlockBigGANpp" and (cin != cout or resamples):
        conv(r, cin, cout, k=1)
    elif cls != "ResnetBlockBigGANpp" and cin != cout:
        nin(r, cin, cout)


def resample(s: Scope, cls: str, cin: int, cout: int, with_conv: bool, fir: bool) -> None:
    """layerspp / layers Upsample or Downsample: FIR `Conv2d` (weight, bias), a 3x3 `Conv`, or nothing."""
    r = s.child(cls)
    if with_conv and fir:
        c = r.child("Conv2d")
        c.param("weight", 3, 3, cin, cout)
        c.param("bias", cout)
    elif with_conv:
        conv(r, cin, cout)


def ncsnpp_tree(config: ml_collections.ConfigDict) -> dict:
    """Leaf shapes of models/ncsnpp.py's NCSNpp, following its __call__."""
    m, ch, root = config.model, config.data.num_channels, Scope({})
    nf, levels, size = m.nf, len(m.ch_mult), config.data.image_size
    if m.embedding_type == "fourier":
        root.child("GaussianFourierProjection").param("W", nf)
    temb = 4 * nf if m.conditional else 0
    if m.conditional:
        dense(root, 2 * nf if m.embedding_type == "fourier" else nf, 4 * nf)
        dense(root, 4 * nf, 4 * nf)
    block = "ResnetBlockDDPMpp" if m.resblock_type == "ddpm" else "ResnetBlockBigGANpp"
    conv(root, ch, nf)
    hs, pyramid = [nf], ch
    for i in range(levels):
        for _ in range(m.num_res_blocks):
            resnet(root, block, hs[-1], nf * m.ch_mult[i], temb)
            if size >> i in m.attn_resolutions:
                attn(root, "AttnBlockpp", nf * m.ch_mult[i])
            hs.append(nf * m.ch_mult[i])
        if i == levels - 1:
            continue
        h = hs[-1]
        if m.resblock_type == "ddpm":
            resample(root, "Downsample", h, h, m.resamp_with_conv, m.fir)
        else:
            resnet(root, block, h, h, temb, resamples=True)
        if m.progressive_input == "input_skip":
            root.child("Downsample")
            c = root.child("Combine")
            conv(c, pyramid, h, k=1)
            h = 2 * h if m.progressive_combine == "cat" else h
        elif m.progressive_input == "residual":
            resample(root, "Downsample", pyramid, h, True, m.fir)
            pyramid = h
        hs.append(h)
    h = hs[-1]
    resnet(root, block, h, h, temb)
    attn(root, "AttnBlockpp", h)
    resnet(root, block, h, h, temb)
    for i in reversed(range(levels)):
        for _ in range(m.num_res_blocks + 1):
            resnet(root, block, h + hs.pop(), nf * m.ch_mult[i], temb)
            h = nf * m.ch_mult[i]
        if size >> i in m.attn_resolutions:
            attn(root, "AttnBlockpp", h)
        if m.progressive == "output_skip":
            if i != levels - 1:
                root.child("Upsample")
            norm(root, "GroupNorm", h)
            conv(root, h, ch)
        elif m.progressive == "residual" and i == levels - 1:
            norm(root, "GroupNorm", h)
            conv(root, h, h)
            pyramid = h
        elif m.progressive == "residual":
            resample(root, "Upsample", pyramid, h, True, m.fir)
            pyramid = h
        if i != 0 and m.resblock_type == "ddpm":
            resample(root, "Upsample", h, h, m.resamp_with_conv, m.fir)
        elif i != 0:
            resnet(root, block, h, h, temb, resamples=True)
    assert not hs
    if m.progressive != "output_skip":
        norm(root, "GroupNorm", h)
        conv(root, h, ch)
    return root.leaves


def ddpm_tree(config: ml_collections.ConfigDict) -> dict:
    """Leaf shapes of models/ddpm.py's DDPM (GroupNorm normalisation, conv/avg-pool resampling)."""
    m, ch, root = config.model, config.data.num_channels, Scope({})
    nf, levels, size = m.nf, len(m.ch_mult), config.data.image_size
    temb = 4 * nf if m.conditional else 0
    if m.conditional:
        dense(root, nf, 4 * nf)
        dense(root, 4 * nf, 4 * nf)
    conv(root, ch, nf)
    hs = [nf]
    for i in range(levels):
        for _ in range(m.num_res_blocks):
            resnet(root, "ResnetBlockDDPM", hs[-1], nf * m.ch_mult[i], temb)
            if size >> i in m.attn_resolutions:
                attn(root, "AttnBlock", nf * m.ch_mult[i])
            hs.append(nf * m.ch_mult[i])
        if i != levels - 1:
            resample(root, "Downsample", hs[-1], hs[-1], m.resamp_with_conv, False)
            hs.append(hs[-1])
    h = hs[-1]
    resnet(root, "ResnetBlockDDPM", h, h, temb)
    attn(root, "AttnBlock", h)
    resnet(root, "ResnetBlockDDPM", h, h, temb)
    for i in reversed(range(levels)):
        for _ in range(m.num_res_blocks + 1):
            resnet(root, "ResnetBlockDDPM", h + hs.pop(), nf * m.ch_mult[i], temb)
            h = nf * m.ch_mult[i]
        if size >> i in m.attn_resolutions:
            attn(root, "AttnBlock", h)
        if i != 0:
            resample(root, "Upsample", h, h, m.resamp_with_conv, False)
    norm(root, "GroupNorm", h)
    conv(root, h, ch)
    return root.leaves


# models/ncsnv2.py: per stage (output multiple of nf, first block's resampling, dilation), then the
# RefineBlock widths (multiples of nf, deepest first).
NCSNV2 = {"ncsnv2_64": (((1, None, 1), (2, "down", 1), (2, "down", 2), (2, "down", 4)), (2, 2, 2, 1)),
          "ncsnv2_128": (((1, None, 1), (2, "down", 1), (2, "down", 1), (4, "down", 2), (4, "down", 4)),
                         (4, 2, 2, 1, 1)),
          "ncsnv2_256": (((1, None, 1), (2, "down", 1), (2, "down", 1), (2, "down", 1), (4, "down", 2),
                          (4, "down", 4)), (4, 2, 2, 2, 1, 1))}


def residual_block(s: Scope, cin: int, cout: int, resample_: str | None, dilation: int) -> None:
    """layers.ResidualBlock: note the shortcut conv comes first when it does not resample."""
    r = s.child("ResidualBlock")
    norm(r, "InstanceNorm2dPlus", cin)
    if resample_ == "down":
        conv(r, cin, cin)
        norm(r, "InstanceNorm2dPlus", cin)
        if dilation > 1:
            conv(r, cin, cout)
            conv(r, cin, cout)
        else:
            conv(r.child("ConvMeanPool"), cin, cout)
            conv(r.child("ConvMeanPool"), cin, cout, k=1)
        return
    if cin != cout:
        conv(r, cin, cout, k=3 if dilation > 1 else 1)
    conv(r, cin, cout)
    norm(r, "InstanceNorm2dPlus", cout)
    conv(r, cout, cout)


def rcu(s: Scope, c: int, n_blocks: int) -> None:
    r = s.child("RCUBlock")
    for _ in range(2 * n_blocks):
        conv(r, c, c, bias=False)


def refine_block(s: Scope, inputs: list[int], features: int, end: bool) -> None:
    b = s.child("RefineBlock")
    for c in inputs:
        rcu(b, c, 2)
    if len(inputs) > 1:
        msf = b.child("MSFBlock")
        for c in inputs:
            conv(msf, c, features)
    crp = b.child("CRPBlock")
    for _ in range(2):
        conv(crp, features, features, bias=False)
    rcu(b, features, 3 if end else 1)


def ncsnv2_tree(config: ml_collections.ConfigDict) -> dict:
    """Leaf shapes of models/ncsnv2.py's NCSNv2 / NCSNv2_128 / NCSNv2_256."""
    stages, widths = NCSNV2[config.model.name]
    nf, ch, root = config.model.nf, config.data.num_channels, Scope({})
    conv(root, ch, nf)
    outs, cin = [], nf
    for mult, resample_, dilation in stages:
        residual_block(root, cin, mult * nf, resample_, dilation)
        residual_block(root, mult * nf, mult * nf, None, dilation)
        outs.append(cin := mult * nf)
    ref = None
    for k, width in enumerate(widths):
        s = len(stages) - 1 - k
        refine_block(root, [outs[s]] + ([ref] if ref else []), width * nf, end=s == 0)
        ref = width * nf
    norm(root, "InstanceNorm2dPlus", ref)
    conv(root, ref, ch)
    return root.leaves


SMALL = {"data.image_size": 16, "model.nf": 8, "model.ch_mult": [1, 2, 3], "model.num_res_blocks": 2,
         "model.attn_resolutions": [8]}
SYNTHETIC = {
    "cifar10 NCSN++ (residual input, FIR convs)": (ncsnpp_tree, "ve/cifar10_ncsnpp_continuous", {}),
    "residual in and out, DDPM blocks, FIR convs": (ncsnpp_tree, "ve/cifar10_ncsnpp_continuous", {
        "model.progressive": "residual", "model.resblock_type": "ddpm"}),
    "residual in and out, DDPM blocks, no FIR, no resampling conv": (ncsnpp_tree, "vp/cifar10_ncsnpp_continuous", {
        "model.progressive": "residual", "model.resblock_type": "ddpm", "model.fir": False,
        "model.resamp_with_conv": False}),
    "output/input skip (cat), no FIR, positional, unconditional": (ncsnpp_tree, "vp/cifar10_ddpmpp_continuous", {
        "model.progressive": "output_skip", "model.progressive_input": "input_skip",
        "model.progressive_combine": "cat", "model.conditional": False}),
    "output skip, input residual, DDPM blocks, FIR": (ncsnpp_tree, "ve/cifar10_ncsnpp_continuous", {
        "model.progressive": "output_skip", "model.resblock_type": "ddpm"}),
    "DDPM, unconditional, no resampling conv": (ddpm_tree, "vp/ddpm/cifar10", {
        "model.nf": 32, "model.conditional": False, "model.resamp_with_conv": False}),
    "DDPM, conditional": (ddpm_tree, "vp/ddpm/cifar10", {"model.nf": 32}),
}
NCSNV2_SMALL = {"data.image_size": 16, "model.nf": 4, "model.flavor": "flax"}
SYNTHETIC |= {f"NCSNv2 {name}": (ncsnv2_tree, "ve/ncsnv2/cifar10", {"model.name": name}) for name in NCSNV2}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_original_layouts_map_one_to_one(case):
    """Each leaf of the original's tree lands on exactly one leaf of sdejax's tree, shapes equal."""
    tree_fn, base, overrides = SYNTHETIC[case]
    config = load_config(base, {**(NCSNV2_SMALL if tree_fn is ncsnv2_tree else SMALL), **overrides})
    shapes = tree_fn(config)
    params = traverse_util.unflatten_dict(
        {tuple(path.split("/")): np.full(shape, i, np.float32) for i, (path, shape) in enumerate(shapes.items())})
    loaded = traverse_util.flatten_dict(from_flax_params(params, config))
    model, (x, labels) = get_model(config), dummy_inputs(config)
    template = traverse_util.flatten_dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, labels)))
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in template.items()}
    assert sorted(int(v.reshape(-1)[0]) for v in loaded.values()) == list(range(len(shapes)))


def test_fir_conv_weight_is_the_original_layout():
    """score_sde's FIR `Conv2d` weight (kh, kw, in, out) is sdejax's FIRConv2d kernel unchanged: its up
    path is a stride-2 transposed convolution with the flipped, in/out-swapped weight followed by
    the FIR filter (pads (p+1)//2 + 1, p//2 + 1); its down path the FIR filter then a stride-2 conv."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
    fir = up_down.setup_kernel((1, 3, 3, 1))
    variables = {"params": {"kernel": w, "bias": jnp.zeros(5)}}
    dn = ("NHWC", "HWIO", "NHWC")
    up = jax.lax.conv_transpose(x, jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2)), (2, 2), "VALID",
                                dimension_numbers=dn, transpose_kernel=True)
    p = (fir.shape[0] - 2) - (w.shape[0] - 1)
    want_up = up_down.upfirdn2d(up, fir * 4, pad=((p + 1) // 2 + 1, p // 2 + 1))
    got_up = up_down.FIRConv2d(5, up=True).apply(variables, x)
    p = (fir.shape[0] - 2) + (w.shape[0] - 1)
    want_down = jax.lax.conv_general_dilated(up_down.upfirdn2d(x, fir, pad=((p + 1) // 2, p // 2)), w, (2, 2),
                                             "VALID", dimension_numbers=dn)
    got_down = up_down.FIRConv2d(5, down=True).apply(variables, x)
    assert got_up.shape == (2, 12, 12, 5) and got_down.shape == (2, 3, 3, 5)
    assert rel_err(got_up, np.asarray(want_up)) < 1e-6 and rel_err(got_down, np.asarray(want_down)) < 1e-6
