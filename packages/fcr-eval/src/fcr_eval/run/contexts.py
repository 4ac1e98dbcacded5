"""What the runner needs from a model family: the embedded default or a Stable Diffusion checkpoint.

The runner (:mod:`fcr_eval.run.runner`) samples, evaluates and fine-tunes through one interface,
:class:`RunContext`, so every variation × seed goes through the same code whatever the model:

==================  ===============================================  =================================================
                    :class:`EmbeddedContext`                          :class:`StableDiffusionContext`
==================  ===============================================  =================================================
UNet                pixel-space UNet, shipped base weights           the checkpoint's UNet (local folder / HF cache)
prompts             Fashion-MNIST class names through a template     COCO / Flickr30k captions, ImageNet-1k labels
                                                                     through a template, or an OOD prompt list
text states         precomputed MiniLM token states                  the checkpoint's CLIP text encoder
images              the sampled pixels                               the VAE decode of the sampled latents
reference           real Fashion-MNIST test images                   the reference dataset's images, centre-cropped
                                                                     to the sampling resolution
alignment           shipped Fashion-MNIST classifier (class agr.)    CLIPScore with a local CLIP (torchmetrics)
σ²_Δ inputs         real training images + their class prompts       VAE latents of reference images + captions
fine-tune data      Fashion-MNIST                                    the experiment's LAION / ArtBench / COCO / ...
==================  ===============================================  =================================================

Both produce images in [0, 1], ``(N, C, H, W)``; a context never writes to the store.

Why one module of this size: it is one interface and its two implementations (embedded default,
Stable Diffusion) side by side, so the two model families stay in step method by method.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fcr_eval.spec.experiment import Experiment
from fcr_eval.spec.names import safe_child

__all__ = ["Prompts", "RunContext", "EmbeddedContext", "EmojiContext", "StableDiffusionContext", "make_context",
           "save_class_grid", "save_prompt_grid"]

logger = logging.getLogger(__name__)


@dataclass
class Prompts:
    """The prompts of one run, in sampling order.

    Attributes:
        texts: the prompt strings.
        ids: one per sample, stable across variations (the per-prompt scores' key for paired tests).
        labels: class index per prompt (embedded default, ImageNet labels), else ``None``.
        classes: the class names ``labels`` index.
        template: index of the prompt template (embedded default: picks the precomputed states).
        source: what the prompts came from (stored as the run's dataset).
        entries: emoji backbone: the emoji set's entry index per prompt (picks its text states).
    """

    texts: list[str]
    ids: list[str]
    labels: torch.Tensor | None = None
    classes: tuple[str, ...] | None = None
    template: int = 0
    source: str = ""
    entries: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts)


class RunContext(ABC):
    """Everything shared by the runs of one experiment. Subclasses load the model family's parts."""

    #: ``embedded`` or ``stable-diffusion``
    family: str
    #: the quality-feature extractor (:mod:`fcr_eval.metrics.extractors`) and the reference features
    extractor = None
    reference = None
    reference_name: str = ""
    #: the alignment scorer: a Fashion-MNIST classifier (embedded) and/or a CLIPScorer
    classifier = None
    #: what the classifier's scores are stored as (feature extractor, preprocessing, description)
    classifier_name: str = ""
    classifier_preprocessing: str = ""
    classifier_description: str = ""
    clip = None
    #: a DDPM scheduler with the model's training noise schedule (σ²_Δ, fine-tuning)
    noise_scheduler = None
    #: where the UNet weights come from (stored as the run's model)
    source: str = ""

    def __init__(self, exp: Experiment, results_dir: Path, device: torch.device):
        self.exp, self.results_dir, self.device = exp, Path(results_dir), device
        self._unet_key: str | None = None
        self._unet = None
        ev = exp.evaluation
        if ev.clip_model and any(m in ev.metrics for m in ("clip_score", "clip_drift")):
            from fcr_eval.metrics.clip_score import CLIPScorer

            self.clip = CLIPScorer(ev.clip_model, device=device)

    # -- the parts every family provides ----------------------------------------------------------
    @abstractmethod
    def load_unet(self, weights: Path | None):
        """A UNet with the base weights (``None``) or a fine-tune's ``final_unet`` folder."""

    @abstractmethod
    def prompts(self, dataset_id: str | None, n: int, robustness=None) -> Prompts:
        """The first ``n`` evaluation prompts of ``dataset_id`` (cycled when there are fewer)."""

    @abstractmethod
    def encode(self, prompts: Prompts, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional text states of ``prompts[sl]`` on the device."""

    @abstractmethod
    def initial_noise(self, n: int, resolution: int, seed: int) -> torch.Tensor:
        """x_T for ``n`` samples at ``resolution`` pixels (CPU, seeded: paired across variations)."""

    def noise_stream(self, n: int, resolution: int, seed: int):
        """Rows of :meth:`initial_noise` ``(n, resolution, seed)`` by batch, without the whole tensor
        (:class:`fcr_eval.run.noise.InitialNoise`: every context draws x_T with ``torch.randn`` from
        a CPU generator seeded with ``seed``)."""
        from fcr_eval.run.noise import InitialNoise

        one = self.initial_noise(1, resolution, seed)
        return InitialNoise(one.shape[1:], n, seed, dtype=one.dtype)

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's final state → images in [0, 1]; differentiable."""

    @abstractmethod
    def scheduler_config(self):
        """The noise schedule samplers are built on (:func:`fcr_eval.run.schedulers.make_sampling_scheduler`)."""

    @abstractmethod
    def sigma2_inputs(self, n: int, seed: int, resolution: int, template: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean training-space inputs z0 and their text states for σ²_Δ (on the device)."""

    @abstractmethod
    def finetune_inputs(self, data_id: str | None) -> tuple[str, object, bool]:
        """``(model, fcr_train.api.DataConfig, hflip)`` for :func:`fcr_train.api.finetune`."""

    @abstractmethod
    def pretrain_flops(self, forward_flops: float) -> tuple[float | None, dict]:
        """Pre-training compute of the base model in FLOPs (or ``None``) and where it came from."""

    @abstractmethod
    def save_grid(self, images: torch.Tensor, prompts: Prompts, path: Path, title: str) -> Path:
        """A PNG grid of samples for people to look at."""

    def evaluation_images(self, images: torch.Tensor) -> torch.Tensor:
        """Samples as the quality features see them (same size as the reference images)."""
        return images

    def sampling_resolution(self) -> int:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------
    def unet(self, weights: Path | None):
        """A fresh UNet (no hooks) with the base weights or a fine-tune's ``final_unet``; the last one
        is kept, so consecutive runs on the same weights do not reload."""
        key = str(weights) if weights else "base"
        if self._unet_key != key:
            self._unet = None  # free the previous weights first
            self._unet = self.load_unet(weights).eval().to(self.device)
            self._unet_key = key
        return self._unet

    def _setup_quality(self) -> None:
        from fcr_eval.metrics.extractors import get_extractor

        ev = self.exp.evaluation
        kwargs = {"image_size": ev.feature_image_size} if ev.feature_extractor == "efficientnet_lite0" else {}
        self.extractor = get_extractor(ev.feature_extractor, device=self.device, weights_path=ev.inception_weights,
                                       **kwargs)

    def _cached_reference(self, name: str, description: str, n: int, images_fn):
        """Reference features from ``results/reference/<name>.npz`` or ``images_fn()`` (extracted once)."""
        from fcr_eval.metrics.quality import load_features, save_features

        path = safe_child(self.results_dir, "reference",
                          f"{name}-n{n}-{self.extractor.name}-{self.extractor.preprocessing}.npz")
        feats = load_features(path, self.extractor)
        if feats is None:
            logger.info("extracting %s features of %s (cached at %s)", self.extractor.name, description, path)
            feats = self.extractor.extract(images_fn())
            save_features(path, feats, reference=name, n=n)
        self.reference_name = description
        return feats


# --------------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------------


class EmbeddedContext(RunContext):
    """The embedded default: shipped pixel-space UNet, MiniLM states, Fashion-MNIST."""

    family = "embedded"

    def __init__(self, exp: Experiment, results_dir: Path, device: torch.device):
        super().__init__(exp, results_dir, device)
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import build_unet, load_embedded_base

        sources = {m.source for m in exp.models.values()}
        if len(sources) != 1:
            raise ValueError(f"{exp.id}: one embedded model per experiment, got {sorted(sources)}")
        self.source = sources.pop()
        self.base = load_embedded_base(random_init=self.source != "embedded")
        if self.source == "embedded-tiny":
            self.base.unet = build_unet(TINY_EMBEDDED_UNET_CONFIG)
        self.base_state = {k: v.detach().clone() for k, v in self.base.unet.state_dict().items()}
        self.unet_config = dict(self.base.unet.config)
        self.noise_scheduler = self.base.scheduler
        self._setup_quality()
        if "class_agreement" in exp.evaluation.metrics:
            from fcr_eval.metrics.class_agreement import (
                FEATURE_EXTRACTOR_NAME,
                PREPROCESSING,
                load_fashion_mnist_classifier,
            )

            self.classifier = load_fashion_mnist_classifier(device=device)
            self.classifier_name, self.classifier_preprocessing = FEATURE_EXTRACTOR_NAME, PREPROCESSING
            self.classifier_description = "shipped Fashion-MNIST CNN (fcr_eval/metrics/weights)"
        ev = exp.evaluation
        ref = exp.datasets.get(ev.reference) if ev.reference else None
        split = ref.split if ref and ref.split else "test"
        self.reference = self._cached_reference(
            f"fashion-mnist-{split}", f"fashion-mnist-{split} (first {ev.n_reference} real images)", ev.n_reference,
            lambda: self.real_images(split, ev.n_reference)[0])

    def real_images(self, split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        from fcr_train.embedded import load_fashion_mnist

        imgs, labels = load_fashion_mnist(split)
        idx = (np.arange(n) + offset) % len(imgs)
        x = torch.from_numpy(imgs[idx]).float().div(255).unsqueeze(1)
        return x, torch.from_numpy(labels[idx])

    def load_unet(self, weights: Path | None):
        from diffusers import UNet2DConditionModel

        if weights is None:
            from fcr_train.embedded import build_unet

            unet = build_unet(self.unet_config)
            unet.load_state_dict(self.base_state)
            return unet
        return UNet2DConditionModel.from_pretrained(weights)

    def sampling_resolution(self) -> int:
        return int(self.unet_config["sample_size"])

    def prompts(self, dataset_id: str | None, n: int, robustness=None) -> Prompts:
        if robustness is not None and robustness.kind == "ood_prompts":
            raise NotImplementedError("the embedded model has text states for its class prompts only; "
                                      "ood_prompts needs a Stable Diffusion model")
        tpl = self.exp.datasets[dataset_id].prompt_template if dataset_id else None
        if tpl is None:
            t = 0
        elif tpl in self.base.templates:
            t = self.base.templates.index(tpl)
        else:
            raise ValueError(f"prompt template {tpl!r} has no precomputed text states; use one of {self.base.templates}")
        classes = tuple(self.base.classes)
        labels = torch.arange(n) % len(classes)
        texts = [self.base.templates[t].format(classes[c]) for c in labels.tolist()]
        return Prompts(texts, [f"{i:05d}" for i in range(n)], labels, classes, t, "fashion-mnist")

    def encode(self, prompts: Prompts, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.base.class_states(prompts.labels[sl], template=prompts.template).to(self.device)
        return c, self.base.null_states.expand(len(c), -1, -1).to(self.device)

    def initial_noise(self, n: int, resolution: int, seed: int) -> torch.Tensor:
        return torch.randn((n, 1, resolution, resolution), generator=torch.Generator().manual_seed(seed))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.clamp(-1, 1) + 1) / 2

    def scheduler_config(self):
        from fcr_train.embedded import make_scheduler

        return make_scheduler("ddim").config

    def evaluation_images(self, images: torch.Tensor) -> torch.Tensor:
        from fcr_eval.metrics.robustness import resize_images

        size = self.sampling_resolution()
        return resize_images(images, size) if images.shape[-1] != size else images

    def sigma2_inputs(self, n: int, seed: int, resolution: int, template: int = 0):
        z0, zl = self.real_images("train", n, offset=seed * n)
        return (z0 * 2 - 1).to(self.device), self.base.class_states(zl, template=template).to(self.device)

    def finetune_inputs(self, data_id: str | None):
        from fcr_train.api import DataConfig

        data = self.exp.datasets.get(data_id) if data_id else None
        cfg = DataConfig(kind="fashion-mnist", split=(data.split if data and data.split else "train"),
                         limit=data.limit if data else None)
        return self.source, cfg, bool(data and data.hflip > 0)

    def pretrain_flops(self, forward_flops: float):
        from fcr_eval.metrics.cost import training_flops

        prov = self.base.provenance or {}
        pre = (prov.get("pretrain_config") or {}).get("train") or {}
        steps, batch = prov.get("steps") or pre.get("max_steps"), pre.get("batch_size")
        if not (steps and batch):
            return None, {"reason": "base weights carry no pre-training record (command.json)"}
        return training_flops(forward_flops, steps * batch), {"pretrain_samples": steps * batch,
                                                              "pretrain_from": "base weights' command.json"}

    def save_grid(self, images, prompts, path, title):
        return save_class_grid(images, prompts.labels, prompts.classes, path,
                               per_class=self.exp.evaluation.grid_per_class, title=title)


# --------------------------------------------------------------------------------------------
# The emoji backbone (latent, RGB, captioned)
# --------------------------------------------------------------------------------------------


class EmojiContext(RunContext):
    """The second embedded backbone: the shipped emoji VAE + latent UNet, MiniLM states of emoji names.

    Sampling runs in the VAE's 8×8×4 latent space and :meth:`decode` is the VAE decode (the path SD
    takes). Prompts are names of the emoji set's ``split`` (default the held-out ``test`` split);
    their class is the Unicode group, judged by the shipped group classifier
    (:mod:`fcr_eval.metrics.emoji_groups`). The reference images are the rendered emoji of the
    reference dataset's split; σ²_Δ encodes real training emoji with the VAE.
    """

    family = "embedded"

    def __init__(self, exp: Experiment, results_dir: Path, device: torch.device):
        super().__init__(exp, results_dir, device)
        from fcr_train.api import load_emoji_model

        sources = {m.source for m in exp.models.values()}
        if len(sources) != 1:
            raise ValueError(f"{exp.id}: one embedded model per experiment, got {sorted(sources)}")
        self.source = sources.pop()
        self.model = next(iter(exp.models.values()))
        self.base = load_emoji_model(self.source)
        self.base.vae.to(device)
        self.base_state = {k: v.detach().clone() for k, v in self.base.unet.state_dict().items()}
        self.unet_config = dict(self.base.unet.config)
        self.vae_scale = 2 ** (len(self.base.vae.config.block_out_channels) - 1)
        self.noise_scheduler = self.base.scheduler
        self._setup_quality()
        if "class_agreement" in exp.evaluation.metrics:
            from fcr_eval.metrics.emoji_groups import (
                FEATURE_EXTRACTOR_NAME,
                PREPROCESSING,
                load_emoji_group_classifier,
            )

            self.classifier = load_emoji_group_classifier(device=device)
            self.classifier_name, self.classifier_preprocessing = FEATURE_EXTRACTOR_NAME, PREPROCESSING
            self.classifier_description = "shipped emoji group CNN (fcr_eval/metrics/weights), Unicode groups"
        ev = exp.evaluation
        ref = exp.datasets.get(ev.reference) if ev.reference else None
        split = ref.split if ref and ref.split else "test"
        n_ref = min(ev.n_reference, len(self.base.data.indices(split)))
        self.reference = self._cached_reference(
            f"emoji-{split}", f"emoji-{split} (first {n_ref} rendered emoji, 32² RGB)", n_ref,
            lambda: self.real_images(split, n_ref)[0])

    def real_images(self, split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rendered emoji of ``split`` in [0, 1] ``(n, 3, 32, 32)`` (cycled) and their entry indices."""
        idx = self.base.data.indices(split)
        imgs = torch.from_numpy(self.base.data.images(split)).permute(0, 3, 1, 2).float().div(255)
        pick = (np.arange(n) + offset) % len(idx)
        return imgs[pick], torch.from_numpy(idx[pick])

    def load_unet(self, weights: Path | None):
        from diffusers import UNet2DConditionModel

        if weights is None:
            unet = UNet2DConditionModel(**self.unet_config)
            unet.load_state_dict(self.base_state)
            return unet
        return UNet2DConditionModel.from_pretrained(weights)

    def sampling_resolution(self) -> int:
        return int(self.unet_config["sample_size"]) * self.vae_scale

    def prompts(self, dataset_id: str | None, n: int, robustness=None) -> Prompts:
        if robustness is not None and robustness.kind == "ood_prompts":
            raise NotImplementedError("ood_prompts needs a Stable Diffusion model")
        ds = self.exp.datasets[dataset_id] if dataset_id else None
        split = ds.split if ds and ds.split else "test"
        data = self.base.data
        entries = data.indices(split)[: ds.limit if ds and ds.limit else None]
        # Balanced over groups as the Fashion-MNIST prompts are: sample i is the (i // G)-th name of
        # group i mod G, cycling within a group when it has fewer names.
        by_group = [entries[[data.entries[int(e)].label == c for e in entries]] for c in range(len(self.base.classes))]
        by_group = [g for g in by_group if len(g)]
        order = [int(by_group[i % len(by_group)][(i // len(by_group)) % len(by_group[i % len(by_group)])])
                 for i in range(n)]
        labels = torch.tensor([data.entries[e].label for e in order])
        texts = [data.entries[e].name for e in order]
        return Prompts(texts, [f"{i:05d}" for i in range(n)], labels, tuple(self.base.classes), 0, f"emoji-{split}",
                       entries=torch.tensor(order))

    def encode(self, prompts: Prompts, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.base.states(prompts.entries[sl]).to(self.device)
        return c, self.base.null_states.expand(len(c), -1, -1).to(self.device)

    def initial_noise(self, n: int, resolution: int, seed: int) -> torch.Tensor:
        if resolution % self.vae_scale:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {self.vae_scale}")
        side = resolution // self.vae_scale
        return torch.randn((n, self.unet_config["in_channels"], side, side), generator=torch.Generator().manual_seed(seed))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        from fcr_train.emoji_backbone import decode_latents

        return decode_latents(self.base.vae, x)

    def scheduler_config(self):
        from fcr_train.emoji_backbone import make_emoji_scheduler

        return make_emoji_scheduler("ddim").config

    def evaluation_images(self, images: torch.Tensor) -> torch.Tensor:
        from fcr_eval.metrics.robustness import resize_images

        size = self.base.data.size
        return resize_images(images, size) if images.shape[-1] != size else images

    def sigma2_inputs(self, n: int, seed: int, resolution: int, template: int = 0):
        from fcr_train.emoji_backbone import encode_images

        x, entries = self.real_images("train", n, offset=seed * n)
        z0 = encode_images(self.base.vae, (x * 2 - 1).to(self.device))
        return z0, self.base.states(entries).to(self.device)

    def finetune_inputs(self, data_id: str | None):
        from fcr_train.api import DataConfig

        data = self.exp.datasets.get(data_id) if data_id else None
        cfg = DataConfig(kind="emoji", split=(data.split if data and data.split else "train"),
                         limit=data.limit if data else None)
        return self.source, cfg, bool(data and data.hflip > 0)

    def pretrain_flops(self, forward_flops: float):
        from fcr_eval.metrics.cost import training_flops

        prov = self.base.provenance or {}
        steps, batch = prov.get("steps"), (prov.get("train_config") or {}).get("batch_size")
        if not (steps and batch):
            return None, {"reason": "emoji UNet weights carry no pre-training record (weights/emoji/command.json)"}
        return training_flops(forward_flops, steps * batch), {"pretrain_samples": steps * batch,
                                                              "pretrain_from": "weights/emoji/command.json"}

    def save_grid(self, images, prompts, path, title):
        return save_prompt_grid(images, prompts.texts, path, n=min(len(images), 18), columns=6, tile=96, title=title)


# --------------------------------------------------------------------------------------------
# Stable Diffusion
# --------------------------------------------------------------------------------------------


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StableDiffusionContext(RunContext):
    """A Stable Diffusion checkpoint (local diffusers folder or HF cache), real prompt sets,
    Inception (or any pluggable) features of real reference images, CLIPScore."""

    family = "stable-diffusion"

    def __init__(self, exp: Experiment, results_dir: Path, device: torch.device, model_id: str | None = None):
        super().__init__(exp, results_dir, device)
        from fcr_train.models import SDConditioner, load_sd_components

        if model_id is None:
            if len(exp.models) != 1:
                raise ValueError(f"{exp.id} has models {list(exp.models)}; say which one the context is for")
            model_id = next(iter(exp.models))
        self.model = exp.models[model_id]
        self.dtype = _DTYPES[exp.sampling.dtype]
        self.comps = load_sd_components(self.model.source, dtype=self.dtype)
        self.source = self.comps.source
        self.comps.vae.to(device)
        self.comps.text_encoder.to(device)
        self.conditioner = SDConditioner(self.comps)
        self.noise_scheduler = self.comps.train_scheduler()
        self.vae_scale = 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.comps.unet.config.in_channels)
        self._base_unet = self.comps.unet
        self._text_cache: dict[str, torch.Tensor] = {}
        self._setup_quality()
        ev = exp.evaluation
        ref = exp.datasets[ev.reference] if ev.reference else None
        if ref is None and any(m in ev.metrics for m in ("fid", "fd", "kid", "precision_recall")):
            raise ValueError(f"{exp.id}: evaluation.reference must name the dataset of real images for FID/KID")
        self.reference = None
        if ref is not None:
            res = self.sampling_resolution()
            self.reference = self._cached_reference(
                f"{ref.id}-{res}px", f"{ref.id} (first {ev.n_reference} real images, centre-cropped to {res}²)",
                ev.n_reference, lambda: self._reference_batches(ref, ev.n_reference, res))

    # -- data ------------------------------------------------------------------------------------
    def sampling_resolution(self) -> int:
        return int(self.exp.sampling.resolution or self.model.resolution or self.comps.resolution)

    def _records(self, ds, unique_images: bool):
        from fcr_train import loaders

        if ds.kind == "coco":
            recs = loaders.coco_records(ds.path, ds.images_dir)
        elif ds.kind == "flickr30k":
            recs = loaders.flickr30k_records(ds.path, ds.images_dir)
        elif ds.kind == "laion":
            recs = loaders.laion_records(ds.path, ds.images_dir)
        elif ds.kind == "artbench":
            recs = loaders.artbench_records(ds.path, ds.split or "test")
        else:
            raise ValueError(f"dataset {ds.id!r} of kind {ds.kind!r} has no images; a reference needs real images "
                             "(coco, flickr30k, laion or artbench)")
        if unique_images:
            seen, out = set(), []
            for r in recs:
                if r.image not in seen:
                    seen.add(r.image)
                    out.append(r)
            recs = out
        return recs[: ds.limit] if ds.limit else recs

    def _image_batches(self, records, resolution: int, batch_size: int = 32, with_captions: bool = False):
        """Decoded images in [0, 1] (unreadable files are skipped and counted, like training data)."""
        from fcr_train.data import ImageCaptionDataset, collate_skip_bad

        ds = ImageCaptionDataset(records, resolution=resolution, name="reference images")
        bad = 0
        for i in range(0, len(ds), batch_size):
            batch = collate_skip_bad([ds[j] for j in range(i, min(i + batch_size, len(ds)))])
            bad += batch["n_bad"]
            if batch["n_bad"]:
                logger.warning("skipped %d unreadable reference image(s): %s", batch["n_bad"], batch["bad"][:3])
            if len(batch["caption"]):
                imgs = (batch["pixels"] + 1) / 2
                yield (imgs, batch["caption"]) if with_captions else imgs
        if bad and bad > 0.05 * len(ds):
            raise RuntimeError(f"{bad} of {len(ds)} reference images could not be read; fix the dataset "
                               "(see the warnings above) so the FID reference is what it claims to be")

    def _reference_batches(self, ref, n: int, resolution: int):
        records = self._records(ref, unique_images=True)
        if len(records) < n:
            logger.warning("reference %s has %d images, fewer than n_reference = %d", ref.id, len(records), n)
        return self._image_batches(records[:n], resolution)

    def prompts(self, dataset_id: str | None, n: int, robustness=None) -> Prompts:
        from fcr_train import loaders

        labels, classes = None, None
        if robustness is not None and robustness.kind == "ood_prompts":
            items = _ood_prompts(robustness.settings.get("prompts"), robustness.id)
            source = f"ood:{robustness.id}"
        else:
            if dataset_id is None:
                raise ValueError(f"{self.exp.id}: sampling.eval_prompts must name the evaluation prompt dataset")
            ds = self.exp.datasets[dataset_id]
            source = ds.id
            if ds.kind == "coco":
                items = [p["prompt"] for p in loaders.coco_prompts(ds.path)]
            elif ds.kind == "flickr30k":
                items = [p["prompt"] for p in loaders.flickr30k_prompts(ds.path)]
            elif ds.kind == "imagenet-classes":
                tpl = (ds.prompt_template or "a photo of a {}").replace("{class}", "{}")
                rows = loaders.imagenet_prompts(tpl)
                items = [p["prompt"] for p in rows]
                classes = tuple(p["class_name"] for p in rows)
                labels = torch.tensor([p["class_index"] for p in rows])
            else:
                raise ValueError(f"dataset {ds.id!r} of kind {ds.kind!r} cannot give evaluation prompts "
                                 "(use coco, flickr30k or imagenet-classes)")
            if ds.limit:
                items = items[: ds.limit]
                labels = labels[: ds.limit] if labels is not None else None
        if not items:
            raise ValueError(f"{source}: no prompts found")
        idx = [i % len(items) for i in range(n)]  # cycled when there are fewer prompts than samples
        return Prompts([items[i] for i in idx], [f"{i:05d}" for i in range(n)],
                       labels[idx] if labels is not None else None, classes, 0, source)

    def _states(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(missing), 64):
            chunk = missing[i : i + 64]
            states = self.conditioner.encode_text(chunk, self.device)
            for t, s in zip(chunk, states, strict=True):
                self._text_cache[t] = s
        return torch.stack([self._text_cache[t] for t in texts])

    def encode(self, prompts: Prompts, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._states(prompts.texts[sl]).to(self.device, self.dtype)
        return c, self._states([""]).to(self.device, self.dtype).expand(len(c), -1, -1)

    def initial_noise(self, n: int, resolution: int, seed: int) -> torch.Tensor:
        if resolution % self.vae_scale:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {self.vae_scale}")
        side = resolution // self.vae_scale
        shape = (n, self.latent_channels, side, side)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.comps.vae
        img = vae.decode(x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
        return ((img.float().clamp(-1, 1) + 1) / 2)

    def scheduler_config(self):
        return self.comps.scheduler.config

    def load_unet(self, weights: Path | None):
        from diffusers import UNet2DConditionModel

        if weights is None:
            if self._base_unet is None:  # freed when a fine-tune was loaded; read it again
                self._base_unet = UNet2DConditionModel.from_pretrained(self.source, subfolder="unet")
            unet = self._base_unet
        else:
            self._base_unet = None
            self.comps.unet = None
            unet = UNet2DConditionModel.from_pretrained(weights)
        return unet.to(self.dtype)

    def sigma2_inputs(self, n: int, seed: int, resolution: int, template: int = 0):
        ev = self.exp.evaluation
        if ev.reference is None:
            raise ValueError(f"{self.exp.id}: σ²_Δ on a Stable Diffusion model encodes real images with the VAE; set "
                             "evaluation.reference to a dataset of real images (coco, flickr30k, laion, artbench)")
        ref = self.exp.datasets[ev.reference]
        records = self._records(ref, unique_images=True)
        if not records:
            raise ValueError(f"σ²_Δ needs real images; reference {ref.id} has none")
        start = (seed * n) % len(records)
        picked = [records[(start + i) % len(records)] for i in range(n)]
        g = torch.Generator().manual_seed(seed)
        zs, states = [], []
        for imgs, caps in self._image_batches(picked, resolution, with_captions=True):
            z, s = self.conditioner({"pixels": imgs * 2 - 1, "caption": caps}, self.device, generator=g)
            zs.append(z)
            states.append(s)
        return torch.cat(zs).to(self.dtype), torch.cat(states).to(self.dtype)

    def finetune_inputs(self, data_id: str | None):
        from fcr_train.api import DataConfig

        if data_id is None:
            raise ValueError(f"{self.exp.id}: finetune.data must name the fine-tuning dataset")
        d = self.exp.datasets[data_id]
        cfg = DataConfig(kind=d.kind, path=d.path, images_dir=d.images_dir, resolution=d.resolution,
                         limit=d.limit, split=d.split or "train")
        return self.model.source, cfg, d.hflip > 0

    def pretrain_flops(self, forward_flops: float):
        from fcr_eval.plan.planner import ASSUMED_GPU_TFLOPS

        m = self.model
        if m.pretrain_compute_flops:
            return m.pretrain_compute_flops, {"pretrain_from": f"models[{m.id}].pretrain_compute_flops"}
        if m.pretrain_a100_hours:
            return m.pretrain_a100_hours * 3600 * ASSUMED_GPU_TFLOPS * 1e12, {
                "pretrain_from": f"models[{m.id}].pretrain_a100_hours = {m.pretrain_a100_hours:g} at an assumed "
                                 f"{ASSUMED_GPU_TFLOPS:g} TFLOP/s effective per A100"}
        return None, {"reason": f"models[{m.id}] states neither pretrain_compute_flops nor pretrain_a100_hours"}

    def save_grid(self, images, prompts, path, title):
        return save_prompt_grid(images, prompts.texts, path, n=min(len(images), 16), title=title)


def _ood_prompts(spec, rob_id: str) -> list[str]:
    """``settings.prompts``: an inline list of prompts or a text file with one prompt per line."""
    if isinstance(spec, list) and all(isinstance(p, str) for p in spec):
        return [p.strip() for p in spec if p.strip()]
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"robustness {rob_id!r}: prompts file {path} does not exist "
                                    "(settings.prompts = a text file, one prompt per line, or a list)")
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    raise ValueError(f"robustness {rob_id!r}: settings.prompts must be a list of prompts or a text file path")


def make_context(exp: Experiment, results_dir: Path, device: torch.device, model_id: str | None = None
                 ) -> RunContext:
    """The context for ``model_id`` of ``exp`` (its only model when ``None``): the embedded default
    or a Stable Diffusion checkpoint. The runner holds one at a time (exp-2 has two SD models)."""
    if exp.embedded and {m.backbone for m in exp.models.values()} == {"emoji"}:
        return EmojiContext(exp, results_dir, device)
    if exp.embedded:
        return EmbeddedContext(exp, results_dir, device)
    if any(m.embedded for m in exp.models.values()):
        raise ValueError(f"{exp.id}: mixes embedded and Stable Diffusion models; use one family per file")
    return StableDiffusionContext(exp, results_dir, device, model_id)


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def save_class_grid(images: torch.Tensor, labels: torch.Tensor, classes, path: Path, per_class: int = 8,
                    title: str | None = None) -> Path:
    """A labelled grid: one row per class, ``per_class`` samples each (PNG, 3× nearest upscaling)."""
    from PIL import Image, ImageDraw

    arr = (images[:, 0].clamp(0, 1).numpy() * 255).round().astype("uint8")
    scale, pad, label_w, top = 3, 2, 84, 18 if title else 0
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    grid = Image.new("L", (label_w + per_class * (w + pad), top + len(classes) * (h + pad)), 255)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill=0)
    for c, name in enumerate(classes):
        idx = (labels == c).nonzero().flatten()[:per_class].tolist()
        y = top + c * (h + pad)
        draw.text((4, y + h // 2 - 6), name, fill=0)
        for j, i in enumerate(idx):
            grid.paste(Image.fromarray(arr[i]).resize((w, h), Image.NEAREST), (label_w + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_prompt_grid(images: torch.Tensor, texts: list[str], path: Path, n: int = 16, columns: int = 4,
                     tile: int = 256, title: str | None = None) -> Path:
    """The first ``n`` samples with their prompts (wrapped under each tile), RGB PNG."""
    import textwrap

    from PIL import Image, ImageDraw

    n = min(n, len(images))
    rows = -(-n // columns)
    cap_h, top, pad = 40, 18 if title else 0, 4
    grid = Image.new("RGB", (columns * (tile + pad), top + rows * (tile + cap_h + pad)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill="black")
    arr = (images[:n].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    for i in range(n):
        x, y = (i % columns) * (tile + pad), top + (i // columns) * (tile + cap_h + pad)
        im = Image.fromarray(arr[i] if arr.shape[-1] == 3 else arr[i, :, :, 0])
        grid.paste(im.convert("RGB").resize((tile, tile), Image.BICUBIC), (x, y))
        lines = textwrap.wrap(texts[i], width=tile // 6)[:3]
        draw.text((x + 2, y + tile + 2), "\n".join(lines), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
