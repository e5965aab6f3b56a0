"""Score networks of "Score-Based Generative Modeling through SDEs" in Flax linen.

`get_model(config)` builds NCSN++ / DDPM++ (`ncsnpp`), DDPM (`ddpm`), NCSN v1 (`ncsn`) and NCSNv2
(`ncsnv2_64|128|256`); `from_torch_state_dict` loads score_sde_pytorch weights.
"""
from sdejax.models.conditioning import null_class
from sdejax.models.convert import from_torch_state_dict, load_checkpoint
from sdejax.models.ddpm import DDPM
from sdejax.models.ncsnpp import NCSNpp
from sdejax.models.ncsnv2 import NCSN, NCSNv2
from sdejax.models.registry import (MODELS, count_params, dummy_inputs, get_model, init_model,
                                    make_apply_fn)

__all__ = ["DDPM", "MODELS", "NCSN", "NCSNpp", "NCSNv2", "count_params", "dummy_inputs",
           "from_torch_state_dict", "get_model", "init_model", "load_checkpoint", "make_apply_fn",
           "null_class"]
