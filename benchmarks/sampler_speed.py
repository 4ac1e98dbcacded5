"""Benchmark: fcr's caches side by side with the peer packages, on one Stable Diffusion pipeline.

    # the docs/benchmarks.md CPU table: SD-layout UNet (32² latent), DDIM-50, CFG 7.5, batch 1
    OMP_NUM_THREADS=1 uv run python benchmarks/sampler_speed.py --threads 1 --rounds 3
    # GPU (benchmarks/gpu.sh runs this): SD-v1.5-architecture UNet at 512², fp16
    python benchmarks/sampler_speed.py --unet sd15 --device cuda --dtype fp16 --batch 1 8
    # the bare-UNet table with the FLOP bound 1/(dec + enc/k)
    uv run python benchmarks/sampler_speed.py --mode bare-unet

Pipeline mode builds a real ``StableDiffusionPipeline`` (random-weight UNet of the chosen layout,
the tiny VAE of ``fcr_sample.testing``, DDIM) and calls it with the same seeded text states and
x_T for every variant: no cache, fcr FD-k (parallel and sequential decoding), fcr's DeepCache
comparator, the DeepCache package (PyPI ``deepcache``, ``DeepCacheSDHelper``), T-GATE (PyPI
``tgate``, ``TgateSDLoader``) and optionally ``torch.compile``. Variants are interleaved round by
round (:func:`fcr_sample.benchmark.benchmark_pipelines`); the table gives s/img with min–max over
rounds and the per-round speed-up against no cache. ``--adaptive deepcache 0.2`` adds the adaptive
cache (its conv_in signal computed at every step, so its time includes the signal), and per
``--deepcache N`` the adaptive DeepCache held to N's schedule: its difference to fcr DeepCache-N is
the signal's overhead; ``--calibrated deepcache 10`` adds a schedule calibrated on the pipeline. The peers are benchmark dependencies (the
root ``dev`` group), never fcr-sample's.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from fcr_common.provenance import code_version
from fcr_sample import (
    AdaptiveCacheConfig,
    DeepCacheConfig,
    EncoderCacheConfig,
    apply_adaptive_cache,
    apply_deep_cache,
    apply_encoder_cache,
    calibrate_schedule,
    remove_adaptive_cache,
    remove_deep_cache,
    remove_encoder_cache,
)
from fcr_sample.benchmark import (
    PipelineVariant,
    benchmark_pipelines,
    benchmark_sampling,
    format_pipeline_table,
    format_table,
)
from fcr_sample.testing import (
    sd15_unet_config,
    small_unet_config,
    tiny_sd_pipeline,
    tiny_unet_config,
)
from tqdm import tqdm

CONFIGS = {"tiny": tiny_unet_config, "small": small_unet_config, "sd15": sd15_unet_config}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: T-GATE's own defaults (``tgate.SD.tgate``): cross-attention cached from step 10 on.
TGATE_SETTINGS = {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"



class Report:
    """Lines printed as they come and kept for ``--out``; the header names machine, code and date."""

    def __init__(self, title: str, machine: str, argv) -> None:
        self.lines: list[str] = []
        self.started = time.perf_counter()
        self.emit(f"# {title}: {machine}; torch {torch.__version__}; code {code_version()}; "
                  f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
        self.emit("command: " + " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]))

    def emit(self, text: str) -> None:
        print(text, flush=True)
        self.lines.append(text)

    def finish(self, out: str | Path | None) -> None:
        self.emit(f"\ntotal {time.perf_counter() - self.started:.0f} s")
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("\n".join(self.lines) + "\n")


def build_pipeline(unet_name: str, resolution: int | None, device, dtype) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around a random-weight UNet of the chosen layout (speed does not
    depend on weight values) with fcr_sample.testing's tiny VAE and DDIM scheduler."""
    base = tiny_sd_pipeline(seed=0)
    overrides = {"sample_size": resolution} if resolution else {}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[unet_name](**overrides)).eval()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet, "scheduler": sched}).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the peers ----------------------------------------------------------------------------------


def _import_peer(module: str, pypi: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise SystemExit(
            f"the {pypi!r} package is needed for its rows: `uv sync --all-packages` (root dev group) or "
            f"`pip install {pypi}`; or leave its rows out (--no-peers)"
        ) from err


def deepcache_package_variant(interval: int, branch: int) -> PipelineVariant:
    DeepCache = _import_peer("DeepCache", "deepcache")
    state = {}

    def enable(pipe):
        helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        state["helper"] = helper

    def disable(pipe):
        state.pop("helper").disable()
        # disable() leaves the original bound methods behind as instance attributes; drop them so
        # the next variant (and torch.compile's guards) sees the untouched modules.
        for m in pipe.unet.modules():
            fwd = m.__dict__.get("forward")
            if getattr(fwd, "__func__", None) is type(m).forward:
                del m.__dict__["forward"]

    return PipelineVariant(f"DeepCache package N{interval}-b{branch}", enable, disable)


def tgate_variant(settings: dict) -> PipelineVariant:
    tgate = _import_peer("tgate", "tgate")

    def disable(pipe):
        # T-GATE replaces Attention.forward on the instances and never restores it.
        for m in pipe.unet.modules():
            if type(m).__name__ == "Attention":
                m.__dict__.pop("forward", None)
                m.__dict__.pop("cache", None)
        pipe.__dict__.pop("tgate", None)

    label = "T-GATE gate{gate_step}/sp{sp_interval}".format(**settings)
    return PipelineVariant(label, tgate.TgateSDLoader, disable, lambda pipe, **kw: pipe.tgate(**kw, **settings))


def compiled_variant() -> PipelineVariant:
    """No cache with the UNet under ``torch.compile`` (compiled once, reused every round)."""
    compiled = {}

    def enable(pipe):
        if "call" not in compiled:
            pipe.unet.compile()
            compiled["call"] = pipe.unet._compiled_call_impl
        pipe.unet._compiled_call_impl = compiled["call"]

    def disable(pipe):
        pipe.unet._compiled_call_impl = None

    return PipelineVariant("no cache, torch.compile(unet)", enable, disable)


def compiled_region_variants(strides, backend: str | None) -> list[PipelineVariant]:
    """fcr-sample's documented recipe: the UNet's blocks compiled (``compile_unet_regions``), the
    cache hook eager; no cache and FD-k. The compiled blocks are kept and swapped in and out, so
    each round reuses the graphs of the warm-up round."""
    from fcr_sample import compile_unet_regions, uncompile_unet_regions
    from fcr_sample.compilation import unet_regions

    saved: dict = {}
    kwargs = {"backend": backend} if backend else {}

    def on(pipe):
        if not saved:
            compile_unet_regions(pipe, dynamic=False, **kwargs)
            saved.update({n: b._compiled_call_impl for n, b in unet_regions(pipe.unet)})
        for n, b in unet_regions(pipe.unet):
            b._compiled_call_impl = saved[n]

    out = [PipelineVariant("no cache, compiled regions", on, uncompile_unet_regions)]
    for k in strides:
        cfg = EncoderCacheConfig(stride=k)
        out.append(PipelineVariant(f"fcr {cfg.label}, compiled regions",
                                   lambda p, c=cfg: (on(p), apply_encoder_cache(p, c)),
                                   lambda p: (remove_encoder_cache(p), uncompile_unet_regions(p))))
    return out


def fcr_variants(strides, fd_modes, deepcache, max_parallel_steps) -> list[PipelineVariant]:
    out = []
    for k in strides:
        for parallel in fd_modes:
            cfg = EncoderCacheConfig(stride=k, parallel_decoding=parallel, max_parallel_steps=max_parallel_steps)
            out.append(PipelineVariant(f"fcr {cfg.label}", lambda p, c=cfg: apply_encoder_cache(p, c),
                                       remove_encoder_cache))
    for interval, branch in deepcache:
        cfg = DeepCacheConfig(cache_interval=interval, cache_branch_id=branch)
        out.append(PipelineVariant(f"fcr {cfg.label}", lambda p, c=cfg: apply_deep_cache(p, c), remove_deep_cache))
    return out


#: label → the adaptive hook of its last enable (its ``signal.refresh_steps`` are reported under the table)
ADAPTIVE_HOOKS: dict[str, object] = {}


def _adaptive_variant(label: str, cfg) -> PipelineVariant:
    def enable(pipe):
        ADAPTIVE_HOOKS[label] = apply_adaptive_cache(pipe, cfg)

    return PipelineVariant(label, enable, remove_adaptive_cache)


def adaptive_variants(adaptive, deepcache) -> list[PipelineVariant]:
    """The adaptive cache at each ``(cache, threshold)``, and, per DeepCache interval N, the adaptive
    DeepCache forced onto N's uniform schedule (``max_cached_steps = N - 1``, a threshold it never
    reaches): the same full steps as fcr DeepCache-N plus the signal, so the two rows' difference
    is the signal's overhead."""
    out = []
    for cache, threshold in adaptive:
        cfg = AdaptiveCacheConfig(threshold=threshold, cache=cache)
        out.append(_adaptive_variant(f"fcr {cfg.label}", cfg))
    for interval, branch in deepcache:
        cfg = AdaptiveCacheConfig(threshold=1e9, cache_branch_id=branch, max_cached_steps=interval - 1)
        out.append(_adaptive_variant(f"fcr {cfg.label} (= N{interval} + signal)", cfg))
    return out


def calibrated_variants(pipe, calibrated, kwargs, steps) -> list[PipelineVariant]:
    """DeepCache / FD on schedules calibrated by feature change on this pipeline's own call (the
    random-weight UNet's schedule: a speed row, its quality means nothing)."""
    out = []
    for cache, budget in calibrated:
        sched = calibrate_schedule(pipe, cache, budget, run=lambda: pipe(**kwargs), num_steps=steps)
        cfg = sched.config()
        apply, remove = (apply_deep_cache, remove_deep_cache) if cache == "deepcache" else (
            apply_encoder_cache, remove_encoder_cache)
        out.append(PipelineVariant(f"fcr {sched.label} {list(sched.steps)}", lambda p, c=cfg, a=apply: a(p, c),
                                   remove))
    return out


# -- the two modes ------------------------------------------------------------------------------


def run_pipeline_mode(args, device, dtype, emit) -> None:
    pipe = build_pipeline(args.unet, args.resolution, device, dtype)
    unet = pipe.unet
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    emit(f"UNet '{args.unet}' ({n_params:.1f}M params, latent {unet.config.sample_size}²), {args.dtype}, "
         f"DDIM-{args.steps}, CFG {args.guidance}, text states 77 × {unet.config.cross_attention_dim} (seeded), "
         f"{args.rounds} timed rounds after a warm-up round, interleaved")
    modes = {"both": (True, False), "parallel": (True,), "sequential": (False,)}[args.fd_modes]
    variants = [PipelineVariant("no cache")]
    if args.compile:
        variants.append(compiled_variant())
        variants += compiled_region_variants(args.strides, args.compile_backend)
    variants += fcr_variants(args.strides, modes, args.deepcache, args.max_parallel_steps)
    variants += adaptive_variants(args.adaptive, args.deepcache if args.adaptive else [])
    twins = {}
    if not args.no_peers:
        for interval, branch in args.deepcache:
            pkg = deepcache_package_variant(interval, branch)
            twins[f"fcr {DeepCacheConfig(interval, branch).label}"] = pkg.label
            variants.append(pkg)
        variants.append(tgate_variant(TGATE_SETTINGS))
    for batch in args.batch:
        g = torch.Generator().manual_seed(1)
        dim = unet.config.cross_attention_dim
        text, null = (torch.randn(batch, 77, dim, generator=g).to(device, dtype) for _ in range(2))
        kwargs = dict(prompt_embeds=text, negative_prompt_embeds=null, num_inference_steps=args.steps,
                      guidance_scale=args.guidance)
        batch_variants = variants + calibrated_variants(pipe, args.calibrated, kwargs, args.steps)
        t0 = time.perf_counter()
        with tqdm(total=len(batch_variants) * (args.rounds + 1), desc=f"batch {batch}", leave=False) as bar:
            rows = benchmark_pipelines(pipe, batch_variants, kwargs, rounds=args.rounds,
                                       progress=lambda m: (bar.set_postfix_str(m[:40]), bar.update()))
        emit(f"\n### batch {batch} ({time.perf_counter() - t0:.0f} s for this table)\n")
        emit(format_pipeline_table(rows, same_as=twins))
        for label, hook in ADAPTIVE_HOOKS.items():
            emit(f"- {label}: full steps of its last call {hook.signal.refresh_steps}")


def run_bare_unet_mode(args, device, dtype, emit) -> None:
    overrides = {"sample_size": args.resolution} if args.resolution else {}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[args.unet](**overrides)).to(device, dtype).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    modes = {"both": (False, True), "parallel": (True,), "sequential": (False,)}[args.fd_modes]
    for batch in args.batch:
        n_variants = 1 + len(modes) * len(args.strides) + len(args.deepcache)
        with tqdm(total=n_variants, desc=f"batch {batch}", leave=False) as bar:
            rows, split = benchmark_sampling(
                unet, scheduler, batch=batch, steps=args.steps, guidance=args.guidance, strides=args.strides,
                parallel_modes=modes, max_parallel_steps=args.max_parallel_steps, deepcache=args.deepcache,
                repeats=args.rounds, progress=lambda m: (bar.set_postfix_str(m), bar.update()))
        emit(f"\n### batch {batch}: one forward = {split.total / 1e9 / (2 * batch):.2f} GFLOPs/image, "
             f"encoder share {split.encoder_share:.1%}\n")
        emit(format_table(rows))


def _cache_setting(cache: str, value: str, kind, flag: str, what: str):
    from bench_cli import UserError
    from fcr_sample.cache_configs import ADAPTIVE_TARGETS

    if cache not in ADAPTIVE_TARGETS:
        raise UserError(f"{flag} {cache} {value}: the cache is one of {ADAPTIVE_TARGETS}")
    try:
        return cache, kind(value)
    except ValueError:
        raise UserError(f"{flag} {cache} {value}: the {what} must be a {'whole number' if kind is int else 'number'}"
                        ) from None


def main(argv=None) -> int:
    from bench_cli import UserError, parser, report_file
    from fcr_common.cli_errors import float_in, int_at_least
    from fcr_eval.plan.validation import check_device

    ap = parser(__doc__)
    ap.add_argument("--mode", choices=("pipeline", "bare-unet"), default="pipeline")
    ap.add_argument("--unet", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--resolution", type=int_at_least(8), default=None, help="latent size (default: the config's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--batch", type=int_at_least(1), nargs="+", default=[1])
    ap.add_argument("--steps", type=int_at_least(2), default=50)
    ap.add_argument("--guidance", type=float_in(0), default=7.5)
    ap.add_argument("--strides", type=int_at_least(2), nargs="+", default=[5, 10])
    ap.add_argument("--fd-modes", choices=("both", "parallel", "sequential"), default="both")
    ap.add_argument("--max-parallel-steps", type=int_at_least(1), default=10)
    ap.add_argument("--deepcache", type=int_at_least(0), nargs=2, action="append", metavar=("N", "BRANCH"),
                    help="DeepCache interval (>= 2) and branch, ours and the package's (default: 5 0)")
    ap.add_argument("--adaptive", nargs=2, action="append", default=[], metavar=("CACHE", "THRESHOLD"),
                    help="the adaptive cache (deepcache or fd) at a threshold (repeatable); also adds, per "
                    "--deepcache N, the adaptive DeepCache on N's schedule (its signal's overhead)")
    ap.add_argument("--calibrated", nargs=2, action="append", default=[], metavar=("CACHE", "BUDGET"),
                    help="DeepCache / FD on a schedule of BUDGET full steps calibrated on the pipeline (repeatable)")
    ap.add_argument("--no-peers", action="store_true", help="leave out the DeepCache package and T-GATE")
    ap.add_argument("--compile", action="store_true",
                    help="add no cache under torch.compile(unet), and no cache / FD-k with the UNet's blocks compiled")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                    "'eager' checks the path quickly on CPU)")
    ap.add_argument("--rounds", type=int_at_least(1), default=3, help="timed rounds per variant")
    ap.add_argument("--out", default=None, help="also write the report (Markdown) to this file")
    args = ap.parse_args(argv)
    args.deepcache = args.deepcache or [(5, 0)]
    if bad := [n for n, _ in args.deepcache if n < 2]:
        raise UserError(f"--deepcache interval(s) {bad}: an interval must be at least 2 (1 recomputes every step)")
    if bad := [k for k in args.strides if k > args.steps] + [n for n, _ in args.deepcache if n > args.steps]:
        raise UserError(f"stride(s) / interval(s) {bad} are larger than --steps {args.steps}; pass at most "
                        f"{args.steps}")
    args.adaptive = [_cache_setting(c, v, float, "--adaptive", "threshold") for c, v in args.adaptive]
    args.calibrated = [_cache_setting(c, v, int, "--calibrated", "budget") for c, v in args.calibrated]
    if bad := [b for _, b in args.calibrated if not 1 <= b <= args.steps]:
        raise UserError(f"--calibrated budget(s) {bad}: a budget is 1..--steps ({args.steps}) full steps")
    if bad := [t for _, t in args.adaptive if not t >= 0]:
        raise UserError(f"--adaptive threshold(s) {bad}: a threshold is >= 0 (0 refreshes every step)")
    check_device(args.device)
    out = report_file(args.out)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    import diffusers

    report = Report(f"sampler_speed ({args.mode})", f"{describe_device(device)}, diffusers {diffusers.__version__}",
                    argv)
    (run_pipeline_mode if args.mode == "pipeline" else run_bare_unet_mode)(args, device, dtype, report.emit)
    report.finish(out)
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
