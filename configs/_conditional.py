"""Class conditioning for a config: a class-conditional score model trained with label dropout (for
classifier-free guidance) and the noise-conditional classifier of classifier guidance
(`sdejax --mode=train_classifier`), with the sampling settings of `sdejax.training.conditioning`."""
from sdejax.models import classifier


def conditional(config, num_classes: int, classifier_name: str, p_uncond: float = 0.1, **classifier_kwargs):
    """`config` made class-conditional: `model.num_classes`, `training.p_uncond` (DiT's and Ho &
    Salimans' 0.1), sampling one class per sample in turn with guidance weight 0, and a classifier."""
    config.model.num_classes = num_classes
    config.training.p_uncond = p_uncond
    sampling = config.sampling
    sampling.class_label = -1  # sample i gets class i mod num_classes
    sampling.guidance_weight = 0.0  # w of s_c + w (s_c - s_u); 0: the conditional model alone
    sampling.guidance_rescale = 0.0
    sampling.classifier_scale = 0.0  # > 0: classifier guidance with the --mode=train_classifier network
    config.classifier = classifier.default_config(classifier_name)
    config.classifier.num_classes = num_classes
    for key, value in classifier_kwargs.items():
        config.classifier[key] = value
    return config
