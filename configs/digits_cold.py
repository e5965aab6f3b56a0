"""Cold diffusion (Bansal et al. 2022) of the 16x16 digits in the unified diffusion framework
(`sdejax.udm`): the small digits DDPM++ restores x0 from x_t = D(x0, t) (MSE, labels 999·t), and samples
by the improved update x_s = x_t − D(x̂0, t) + D(x̂0, s) on 20 steps from the held-out digits pushed to
t = 1 (plus a small Gaussian perturbation, since the update is deterministic).

    sdejax --config=configs/digits_cold.py --workdir=runs/digits_cold_blur         # Gaussian blur, σ = 8√t
    sdejax --config=configs/digits_cold.py:mask --workdir=runs/digits_cold_mask    # pixel masking
"""
from configs import digits_ddpmpp


def get_config(variant: str = "blur"):
    config = digits_ddpmpp.get_config()
    t, s = config.training, config.sampling
    t.objective = "udm"
    t.degradation = variant
    if variant == "blur":
        t.blur_sigma_max = 8.0  # the 16x16 frame is then nearly constant
        s.udm_prior_noise = 0.02
    else:
        t.mask_fill = 0.0  # mid-gray in [−1, 1], distinct from the background (−1)
        s.udm_prior_noise = 0.1
    t.batch_size, t.n_iters = 64, 600  # a 2-CPU budget
    t.n_jitted_steps = 1
    t.snapshot_sampling = False
    t.digits_monitor = False
    s.udm_rule = "cold_improved"
    s.num_steps = 20
    config.eval.enable_bpd = False
    return config
