"""Names fcr-train's configs accept, importable without torch (fcr-eval's experiment schema
checks them at load time): feature distances, units of Δ, the embedded default's model names and
the output-consistency and rollout objectives' options. Their meaning lives in :mod:`fcr_train.loss`,
:mod:`fcr_train.embedded` and :mod:`fcr_train.output_consistency`.
"""

__all__ = ["DISTANCES", "DELTA_UNITS", "EMBEDDED_MODELS", "unknown_model_name", "OC_CACHES", "OC_TRAINABLE", "PROMPT_TEMPLATES",
           "ROLLOUT_DEFAULTS", "ROLLOUT_TARGETS", "check_choice",
           "FASHION_MNIST_SPLITS", "SD_PARTS", "EMOJI_MODELS", "EMOJI_GROUPS", "EMOJI_SPLITS",
           "EMBEDDED_BACKBONES"]

#: Distances between two encoder feature maps (or two UNet outputs) a consistency loss can use.
DISTANCES = ("mse", "relative_mse", "cosine")
#: What one unit of Δ is: a DDPM training timestep, or one step of the sampler the fine-tune serves.
DELTA_UNITS = ("timesteps", "sampler_steps")
#: Model names of the embedded default: the shipped base weights, the same UNet untrained, and a
#: tiny UNet for tests.
EMBEDDED_MODELS = ("embedded", "embedded-random", "embedded-tiny")
#: Model names of the second embedded backbone (latent, RGB, captioned: :mod:`fcr_train.emoji_backbone`):
#: the shipped VAE + UNet, the same UNet untrained on the shipped VAE, and a tiny UNet for tests.
EMOJI_MODELS = ("emoji", "emoji-random", "emoji-tiny")
#: Which embedded backbone each embedded model name belongs to (the model-alias vocabulary's owner).
EMBEDDED_BACKBONES = {**{m: "fashion-mnist" for m in EMBEDDED_MODELS}, **{m: "emoji" for m in EMOJI_MODELS}}
#: The emoji set's classes: Unicode's emoji groups (emoji-test.txt), ``Component`` left out.
EMOJI_GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
                "Activities", "Objects", "Symbols", "Flags")
#: The emoji set's splits: training images and the held-out split fixed by a seed.
EMOJI_SPLITS = ("train", "test")
#: The caches whose reused-step situation the output-consistency term can train.
OC_CACHES = ("fd", "deepcache")
#: Which parameters the output-consistency term's gradient may reach: what the cache recomputes at
#: a reused step, or everything (also through the stale features).
OC_TRAINABLE = ("recomputed", "all")
#: What the rollout objective compares after a served segment: the predicted x0 at its last step, or
#: the latent the rest of the run continues from (:mod:`fcr_train.rollout`).
ROLLOUT_TARGETS = ("x0", "state")
#: The rollout objective's defaults (:class:`fcr_train.rollout.RolloutConfig` takes them from here, so
#: that the experiment schema fills a variation's unset rollout options with the same values).
ROLLOUT_DEFAULTS = {"k": 4, "cache": "fd", "target": "x0", "noise_power": 2.0, "trainable": "recomputed",
                    "rollout_rows": None, "guidance_scale": 1.0}
#: The embedded default's caption templates: its shipped text states cover exactly these (a class
#: name goes into ``{}``), so an experiment's ``prompt_template`` for it must be one of them.
PROMPT_TEMPLATES = ("a photo of a {}", "a {}", "a product photo of a {}", "a black and white photo of a {}")
#: Images per split of Fashion-MNIST (Debian dataset-fashion-mnist, the embedded default's data).
FASHION_MNIST_SPLITS = {"train": 60_000, "test": 10_000}
#: The subfolders of a Stable Diffusion checkpoint (diffusers layout) that fine-tuning and the runner load.
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_choice(owner: str, field: str, value, choices) -> None:
    """Refuse a config value outside its vocabulary, naming the field and the allowed values.

    Example:
        >>> check_choice("RolloutConfig", "target", "eps", ROLLOUT_TARGETS)
        ValueError: RolloutConfig.target must be one of ('x0', 'state'), got 'eps'
    """
    if value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {tuple(choices)}, got {value!r}")


def unknown_model_name(source: str) -> str | None:
    """Why ``source`` cannot name a model, or ``None``: a bare word that is no embedded model, no
    short Stable Diffusion name, no hub id (``org/name``) and no folder here is a typo, and is
    reported as one (with the nearest name) rather than sent to the hub.

    Example:
        >>> unknown_model_name("embeded")
        "'embeded' is not a model: did you mean 'embedded'? A model is one of embedded, ..."
    """
    import difflib
    from pathlib import Path

    from fcr_sample.vocabulary import MODEL_IDS

    names = [*EMBEDDED_BACKBONES, *MODEL_IDS]
    if source in names or "/" in source or "\\" in source or Path(source).expanduser().exists():
        return None
    near = difflib.get_close_matches(source, names, n=1, cutoff=0.6)
    return (f"{source!r} is not a model{f': did you mean {near[0]!r}?' if near else '.'} A model is one of "
            f"{', '.join(names)}, a hub id (org/name) or a local diffusers folder")
