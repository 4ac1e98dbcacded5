"""``fcr-train``: FCR fine-tuning and base-model pretraining from the command line.

    fcr-train finetune --model embedded --lam 0.1 --blocks late --max-steps 500 --output-dir runs/fcr
    fcr-train finetune --model embedded --oc-lam 0.1 --oc-cache fd --oc-delta-max 10 --output-dir runs/oc
    fcr-train finetune --model embedded --rollout-lam 0.5 --rollout-k 4 --rollout-cache deepcache --output-dir runs/ro
    fcr-train finetune --model sd15 --data laion --data-path laion.parquet --images-dir imgs/ ...
    fcr-train pretrain --output-dir runs/pretrain --export-dir packages/fcr-train/src/fcr_train/weights
    accelerate launch -m fcr_train.cli finetune ...      # multi-GPU / multi-node

Add ``--resume`` to continue an interrupted run from its newest checkpoint in ``--output-dir``
(one whose files are cut off is reported and the previous complete one is used);
``--resume-from`` a checkpoint of another model, or ``--blocks`` naming no feature of the model, is
refused before the run folder is created.

A bad argument or input (a value out of range, a missing data file, a model that is not here, data
whose images cannot be read) stops before the run folder is created, with one line
``fcr-train: error: ...`` on stderr and exit code 2 (3: the model is not available); ``--debug`` or
``FCR_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fcr_common.cli_errors import (
    EXIT_MODEL_NOT_AVAILABLE,
    EXIT_USAGE,
    UserError,
    add_debug_argument,
    float_in,
    int_at_least,
    run_cli,
)

from .api import DataConfig, FinetuneConfig, PretrainConfig, finetune, pretrain
from .loss import DELTA_UNITS, DISTANCES, FCRConfig
from .output_consistency import OC_CACHES, OC_TRAINABLE, OutputConsistencyConfig
from .rollout import ROLLOUT_TARGETS, RolloutConfig
from .trainer import RunResult, TrainConfig
from .vocabulary import EMOJI_MODELS

__all__ = ["main", "build_parser"]

logger = logging.getLogger("fcr_train.cli")


def _add_train_args(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--output-dir", default=defaults.output_dir, help="run folder (config, logs, checkpoints) [%(default)s]")
    g.add_argument("--max-steps", type=int_at_least(1), default=defaults.max_steps, help="optimizer steps [%(default)s]")
    g.add_argument("--batch-size", type=int_at_least(1), default=defaults.batch_size, help="rows per process per micro-batch [%(default)s]")
    g.add_argument("--grad-accum", type=int_at_least(1), default=defaults.grad_accum, help="micro-batches per optimizer step [%(default)s]")
    g.add_argument("--lr", type=float_in(0, low_open=True), default=defaults.lr, help="AdamW learning rate [%(default)s]")
    g.add_argument("--weight-decay", type=float_in(0), default=defaults.weight_decay, help="AdamW weight decay [%(default)s]")
    g.add_argument("--warmup-steps", type=int_at_least(0), default=defaults.warmup_steps, help="linear LR warm-up steps, then constant [%(default)s]")
    g.add_argument("--max-grad-norm", type=float_in(0), default=defaults.max_grad_norm, help="gradient clipping norm, 0 = off [%(default)s]")
    g.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=defaults.mixed_precision,
                   help="accelerate mixed precision [%(default)s]")
    g.add_argument("--grad-checkpointing", action="store_true", default=defaults.grad_checkpointing,
                   help="recompute UNet block activations in backward (less memory, ~30%% slower)")
    g.add_argument("--ema-decay", type=float_in(0, 1, high_open=True), default=defaults.ema_decay, help="keep an EMA of the weights with this decay; final weights are the EMA [%(default)s]")
    g.add_argument("--checkpoint-every", type=int_at_least(1), default=defaults.checkpoint_every, help="save a resumable checkpoint every N steps [%(default)s]")
    g.add_argument("--keep-checkpoints", type=int_at_least(1), default=defaults.keep_checkpoints, help="keep only the newest N checkpoints (default: all) [%(default)s]")
    g.add_argument("--seed", type=int_at_least(0), default=defaults.seed, help="seed for data order, t, delta, noise, flips [%(default)s]")
    g.add_argument("--no-hflip", dest="hflip", action="store_false", default=defaults.hflip, help="disable the random horizontal flip (p=0.5)")
    g.add_argument("--cond-dropout", type=float_in(0, 1), default=defaults.cond_dropout, help="probability of training a row unconditionally (for guidance) [%(default)s]")
    g.add_argument("--num-workers", type=int_at_least(0), default=defaults.num_workers, help="DataLoader worker processes [%(default)s]")
    g.add_argument("--max-bad-fraction", type=float_in(0, 1), default=defaults.max_bad_fraction,
                   help="stop when more than this fraction of samples was unreadable [%(default)s]")
    g.add_argument("--max-bad-count", type=int_at_least(0), default=defaults.max_bad_count, help="stop when more than this many samples were unreadable [%(default)s]")
    g.add_argument("--max-minutes", type=float_in(0, low_open=True), default=None, help="stop with a checkpoint after this many minutes (records the steps done)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir (exact: model, optimizer, LR, RNG, data position)")
    g.add_argument("--resume-from", default=None, help="continue from this checkpoint folder instead")
    g.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    f = p.add_argument_group("FCR loss")
    # None = not given: the default is the config's, or 0 when the output-consistency term is on
    # (the two are exclusive), so `--oc-lam` alone does not collide with FCR's default λ.
    p.set_defaults(fcr_lam_default=defaults.fcr.lam)
    f.add_argument("--lam", type=float_in(0), default=None,
                   help=f"weight of the feature-consistency term; 0 = plain fine-tuning [{defaults.fcr.lam}; 0 with --oc-lam]")
    f.add_argument("--delta-max", type=int_at_least(1), default=defaults.fcr.delta_max, help="Delta ~ U(1, delta_max) timesteps between branches [%(default)s]")
    f.add_argument("--delta-scale", type=int_at_least(1), default=defaults.fcr.delta_scale,
                   help="training timesteps per unit of Delta: 1 = DDPM timesteps (paper); 20 = DDIM-50 sampler steps (cache-stride units) [%(default)s]")
    f.add_argument("--blocks", default="all", help="encoder features regularised: all | early | mid | late | comma-separated name prefixes, e.g. down_blocks.1,mid_block [%(default)s]")
    f.add_argument("--distance", choices=DISTANCES, default=defaults.fcr.distance, help="feature distance [%(default)s]")
    f.add_argument("--stop-grad", action="store_true", default=defaults.fcr.stop_grad, help="no gradient through the x_{t-Delta} branch")
    f.add_argument("--no-batched-encoders", dest="batched", action="store_false", help="run the two encoder passes separately (default: one 2B batch)")


#: The output-consistency options besides --oc-lam, with their OutputConsistencyConfig field.
_OC_OPTIONS = {"oc_delta_max": "delta_max", "oc_delta_unit": "delta_unit", "oc_sampler_steps": "sampler_steps",
               "oc_stride": "stride", "oc_distance": "distance", "oc_cache": "cache",
               "oc_cache_branch_id": "cache_branch_id", "oc_trainable": "trainable"}


def _add_output_consistency_args(p: argparse.ArgumentParser) -> None:
    d = OutputConsistencyConfig()
    o = p.add_argument_group("output consistency (instead of FCR): lambda * d(UNet output with stale cached "
                             "features from x_{t+Delta}, sg[UNet output at x_t])")
    o.add_argument("--oc-lam", type=float_in(0, low_open=True), default=None,
                   help="weight of the output-consistency term; turns it on (and FCR's --lam default to 0)")
    o.add_argument("--oc-delta-max", type=int_at_least(1), default=None,
                   help=f"Delta ~ U(1, max) between the cache's key step and the reused step [{d.delta_max}]")
    o.add_argument("--oc-delta-unit", choices=DELTA_UNITS, default=None, help=f"unit of Delta [{d.delta_unit}]")
    o.add_argument("--oc-sampler-steps", type=int_at_least(1), default=None,
                   help=f"the sampler's step count, for --oc-delta-unit sampler_steps [{d.sampler_steps}]")
    o.add_argument("--oc-stride", type=int_at_least(1), default=None,
                   help="the cache stride the fine-tune serves (recorded; the default of --oc-delta-max)")
    o.add_argument("--oc-distance", choices=DISTANCES, default=None, help=f"output distance [{d.distance}]")
    o.add_argument("--oc-cache", choices=OC_CACHES, default=None,
                   help=f"whose stale features: fd (encoder cache) or deepcache [{d.cache}]")
    o.add_argument("--oc-cache-branch-id", type=int_at_least(0), default=None,
                   help=f"DeepCache's cut, 3*block + layer (with --oc-cache deepcache) [{d.cache_branch_id}]")
    o.add_argument("--oc-trainable", choices=OC_TRAINABLE, default=None,
                   help="parameters the term's gradient may reach: recomputed (what the cache re-runs at a reused "
                        f"step) or all (also through the stale features) [{d.trainable}]")


def _given_options(args, options: dict[str, str], lam_option: str, term: str) -> dict | None:
    """The config fields a term's options set, or ``None`` when its λ option is absent (then any of
    its other options is an error: it would silently do nothing)."""
    given = {field: getattr(args, opt) for opt, field in options.items() if getattr(args, opt, None) is not None}
    if getattr(args, lam_option, None) is None:
        if given:
            flag = "--" + lam_option.replace("_", "-")
            flags = ", ".join("--" + opt.replace("_", "-") for opt in options if getattr(args, opt, None) is not None)
            raise UserError(f"{flags} set without {flag}. Add {flag} (e.g. 0.1) to turn the {term} term on, "
                            "or drop those options")
        return None
    return given


def _output_consistency(args) -> OutputConsistencyConfig | None:
    given = _given_options(args, _OC_OPTIONS, "oc_lam", "output-consistency")
    if given is None:
        return None
    if given.get("stride") is not None and "delta_max" not in given:
        given["delta_max"] = None  # Δ_max = the stride it serves
    return OutputConsistencyConfig(lam=args.oc_lam, **given)


#: The rollout options besides --rollout-lam, with their RolloutConfig field.
_ROLLOUT_OPTIONS = {"rollout_k": "k", "rollout_cache": "cache", "rollout_cache_branch_id": "cache_branch_id",
                    "rollout_sampler_steps": "sampler_steps", "rollout_target": "target",
                    "rollout_distance": "distance", "rollout_noise_power": "noise_power",
                    "rollout_trainable": "trainable", "rollout_rows": "rollout_rows",
                    "rollout_guidance_scale": "guidance_scale", "rollout_stride": "stride"}


def _add_rollout_args(p: argparse.ArgumentParser) -> None:
    d = RolloutConfig()
    r = p.add_argument_group("rollout (instead of FCR): lambda * d(k stale steps of the cache after a key step, "
                             "sg[the same steps fresh]) on the sampler's DDIM grid")
    r.add_argument("--rollout-lam", type=float_in(0, low_open=True), default=None,
                   help="weight of the rollout term; turns it on (and FCR's --lam default to 0)")
    r.add_argument("--rollout-k", type=int_at_least(0), default=None, help=f"stale steps after the key step [{d.k}]")
    r.add_argument("--rollout-cache", choices=OC_CACHES, default=None, help=f"fd (encoder cache) or deepcache [{d.cache}]")
    r.add_argument("--rollout-cache-branch-id", type=int_at_least(0), default=None,
                   help=f"DeepCache's cut, 3*block + layer (with --rollout-cache deepcache) [{d.cache_branch_id}]")
    r.add_argument("--rollout-sampler-steps", type=int_at_least(1), default=None,
                   help=f"the DDIM sampler's step count: the key steps' grid [{d.sampler_steps}]")
    r.add_argument("--rollout-target", choices=ROLLOUT_TARGETS, default=None,
                   help=f"compare the predicted x0 at the segment's last step or the state after it [{d.target}]")
    r.add_argument("--rollout-distance", choices=DISTANCES, default=None, help=f"distance [{d.distance}]")
    r.add_argument("--rollout-noise-power", type=float_in(0), default=None,
                   help=f"key step i drawn with probability ~ (t_i / T)^power; 0 = uniform [{d.noise_power}]")
    r.add_argument("--rollout-trainable", choices=OC_TRAINABLE, default=None,
                   help=f"parameters the term may reach: recomputed or all [{d.trainable}]")
    r.add_argument("--rollout-rows", type=int_at_least(1), default=None,
                   help="rows of each micro-batch that run the rollout [all]")
    r.add_argument("--rollout-guidance-scale", type=float_in(0, low_open=True), default=None,
                   help=f"classifier-free guidance of the rollouts [{d.guidance_scale}]")
    r.add_argument("--rollout-stride", type=int_at_least(1), default=None, help="the cache stride served (recorded)")


def _rollout(args) -> RolloutConfig | None:
    given = _given_options(args, _ROLLOUT_OPTIONS, "rollout_lam", "rollout")
    return None if given is None else RolloutConfig(lam=args.rollout_lam, **given)


def _train_config(args) -> TrainConfig:
    blocks = args.blocks if args.blocks in ("all", "early", "mid", "late") else tuple(s.strip() for s in args.blocks.split(",") if s.strip())
    oc, ro = _output_consistency(args), _rollout(args)
    if oc is not None and ro is not None:
        raise ValueError("the output-consistency and rollout terms are exclusive (one objective per fine-tune): "
                         "give --oc-lam or --rollout-lam, not both")
    lam = args.lam if args.lam is not None else (0.0 if oc is not None or ro is not None else args.fcr_lam_default)
    return TrainConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, mixed_precision=args.mixed_precision,
        grad_checkpointing=args.grad_checkpointing, ema_decay=args.ema_decay, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, seed=args.seed, hflip=args.hflip, cond_dropout=args.cond_dropout,
        num_workers=args.num_workers, max_bad_fraction=args.max_bad_fraction, max_bad_count=args.max_bad_count,
        max_time_s=None if args.max_minutes is None else 60 * args.max_minutes,
        resume=args.resume_from or args.resume, cpu=args.cpu, progress=args.progress,
        objective=oc if oc is not None else ro,
        fcr=FCRConfig(lam=lam, delta_max=args.delta_max, delta_scale=args.delta_scale, blocks=blocks, distance=args.distance,
                      stop_grad=args.stop_grad, batched=args.batched),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcr-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_debug_argument(parser)
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice); 1 is fastest on a heavily shared CPU")
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a UNet with L_denoise + lambda * FCR",
                        description="Fine-tune a UNet with L_denoise + lambda * d(Enc(x_t), Enc(x_{t-Delta})).")
    m = ft.add_argument_group("model and data")
    m.add_argument("--model", default="embedded",
                   help="embedded (shipped base weights) | embedded-random | embedded-tiny | emoji (the latent emoji "
                        "backbone) | emoji-random | emoji-tiny | sd15 | sd21 | openjourney | "
                        "a hub id | a local diffusers folder [%(default)s]")
    m.add_argument("--base-weights", default=None, help="UNet folder for --model embedded (default: the shipped weights)")
    m.add_argument("--revision", default=None, help="hub revision for SD models")
    m.add_argument("--variant", default=None, help="weights variant for SD models, e.g. fp16")
    m.add_argument("--data", default=None, choices=("fashion-mnist", "emoji", "laion", "webdataset", "artbench", "coco",
                                                    "flickr30k"),
                   help="dataset format [fashion-mnist; emoji for the emoji models]")
    m.add_argument("--data-path", default=None, help="table/JSON/captions file, shard folder or glob, or class-folder root; "
                                                      "for fashion-mnist the IDX folder (default /usr/share/datasets/fashion-mnist)")
    m.add_argument("--images-dir", default=None, help="folder the image names in --data-path are relative to")
    m.add_argument("--resolution", type=int_at_least(8), default=None, help="training resolution (default: 512 for SD, 28 embedded)")
    m.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N samples")
    m.add_argument("--image-column", default=None, help="LAION table column with image paths (auto-detected)")
    m.add_argument("--caption-column", default=None, help="LAION table column with captions (auto-detected)")
    _add_train_args(ft, FinetuneConfig().train)
    _add_output_consistency_args(ft)
    _add_rollout_args(ft)

    pt = sub.add_parser("pretrain", help="train the embedded Fashion-MNIST base UNet from scratch",
                        description="Train the embedded base UNet (pixel space, MiniLM text states) from scratch on Fashion-MNIST.")
    pdef = PretrainConfig()
    pg = pt.add_argument_group("base model")
    pg.add_argument("--unet-config", choices=("embedded", "tiny"), default=pdef.unet_config, help="UNet size [%(default)s]")
    pg.add_argument("--data-path", default=None, help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    pg.add_argument("--limit", type=int_at_least(1), default=None, help="use only the first N training images")
    pg.add_argument("--export-dir", default=None, help="write final weights + command.json + samples.png here")
    pg.add_argument("--grid-columns", type=int_at_least(1), default=pdef.grid_columns, help="samples per class in samples.png [%(default)s]")
    pg.add_argument("--sample-steps", type=int_at_least(1), default=pdef.sample_steps, help="DDIM steps for samples.png [%(default)s]")
    pg.add_argument("--guidance-scale", type=float_in(0), default=pdef.guidance_scale, help="classifier-free guidance for samples.png [%(default)s]")
    _add_train_args(pt, pdef.train)
    return parser


def _summary(result: RunResult) -> str:
    rows = [
        ("run folder", str(result.run_dir)),
        ("steps", str(result.steps)),
        ("final loss", f"{result.last_logs.get('loss', float('nan')):.5f}"),
        ("L_denoise", f"{result.last_logs.get('l_denoise', float('nan')):.5f}"),
        ("L_fcr", f"{result.last_logs.get('l_fcr', float('nan')):.5f}"),
        *([("L_oc", f"{result.last_logs['l_oc']:.5f}")] if "l_oc" in result.last_logs else []),
        *([("L_rollout", f"{result.last_logs['l_rollout']:.5f}")] if "l_rollout" in result.last_logs else []),
        ("step time (last)", f"{result.last_logs.get('step_time_s', float('nan')):.3f} s"),
        ("wall time", f"{result.wall_time_s:.1f} s"),
        ("last checkpoint", str(result.last_checkpoint)),
        ("final UNet", str(result.final_unet)),
        ("best checkpoint", str(result.best_checkpoint)),
        ("stopped early", str(result.stopped_early)),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _check_paths(args) -> None:
    """Paths the run needs, checked before anything is loaded or created."""
    from .vocabulary import unknown_model_name

    if getattr(args, "model", None) and (problem := unknown_model_name(args.model)):
        raise UserError(f"--model {problem}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder. Pass a folder for the run "
                        "(it is created if missing)")
    if args.resume_from is not None and not (Path(args.resume_from) / "trainer_state.json").is_file():
        what = "does not exist" if not Path(args.resume_from).exists() else "is not a complete checkpoint (no trainer_state.json)"
        raise UserError(f"--resume-from {args.resume_from} {what}. Pass a checkpoint folder such as "
                        f"{out / 'checkpoints' / 'step_0000500'}, or use --resume for the newest one in --output-dir")
    data_path = args.data_path
    if data_path is not None and not any(c in data_path for c in "*?[") and not Path(data_path).exists():
        raise UserError(f"--data-path {data_path} does not exist. Pass the dataset's file or folder")
    images_dir = getattr(args, "images_dir", None)
    if images_dir is not None and not Path(images_dir).is_dir():
        raise UserError(f"--images-dir {images_dir} is not a folder. Pass the folder the image names "
                        "in --data-path are relative to")
    base = getattr(args, "base_weights", None)
    if base is not None and not Path(base).is_dir():
        raise UserError(f"--base-weights {base} is not a folder. Pass a UNet folder in diffusers layout "
                        "(config.json + diffusion_pytorch_model.safetensors)")


def _run(args, argv: list[str] | None) -> int:
    _check_paths(args)
    try:
        train_cfg = _train_config(args)
    except ValueError as exc:  # the configs' own checks (FCRConfig, ...): a usage error
        raise UserError(f"{exc}. Fix the option and run again") from exc
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = ["fcr-train", *(sys.argv[1:] if argv is None else argv)]
    if args.command == "finetune":
        data_kind = args.data or ("emoji" if args.model in EMOJI_MODELS else "fashion-mnist")
        if (args.model in EMOJI_MODELS) != (data_kind == "emoji"):
            raise UserError(f"--model {args.model} with --data {data_kind}: the emoji models train on --data emoji "
                            "and only they do")
        cfg = FinetuneConfig(
            model=args.model, base_weights=args.base_weights, revision=args.revision, variant=args.variant,
            data=DataConfig(kind=data_kind, path=args.data_path, images_dir=args.images_dir,
                            resolution=args.resolution, limit=args.limit,
                            image_column=args.image_column, caption_column=args.caption_column),
            train=train_cfg,
        )
        result = finetune(cfg)
    else:
        cfg = PretrainConfig(train=train_cfg, unet_config=args.unet_config, data_dir=args.data_path, limit=args.limit,
                             export_dir=args.export_dir, grid_columns=args.grid_columns,
                             sample_steps=args.sample_steps, guidance_scale=args.guidance_scale)
        result = pretrain(cfg, command=command)
    print(_summary(result))
    return 0


# Bad input besides UserError and missing paths: config and data checks raise ValueError,
# a missing optional dependency ImportError.
USER_ERRORS = {
    ValueError: EXIT_USAGE,
    ImportError: EXIT_USAGE,
    "fcr_train.data:TooManyBadSamples": EXIT_USAGE,
    "fcr_train.models:ModelNotAvailableError": EXIT_MODEL_NOT_AVAILABLE,
    "fcr_sample.loading:ModelNotAvailableError": EXIT_MODEL_NOT_AVAILABLE,
    "fcr_common.locking:LockHeldError": EXIT_USAGE,  # another fine-tune writes into that folder
    "fcr_train.checkpoints:CheckpointError": EXIT_USAGE,  # resume checkpoint cut off or of another model
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: _run(args, argv), prog="fcr-train", debug=args.debug, user_errors=USER_ERRORS,
                   on_interrupt="interrupted: continue from the newest checkpoint with --resume")


if __name__ == "__main__":
    sys.exit(main())
