"""Screenshot of the rating page (docs/human-study-rating.png) with headless Chromium.

Builds a throw-away results store from Fashion-MNIST test images (two pretend variations: the
image and a lightly smoothed copy, as two samplers would give for one prompt and seed), builds a
study from it, starts the app on 127.0.0.1 and opens an invitation link in Chromium.

    apt-get install -y chromium
    uv run python apps/human-study/scripts/screenshot_rating_page.py docs/human-study-rating.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fcr_eval.store import ResultsStore, RunRecord, RunResult, SampleRecord, make_run_id
from fcr_human_study.app import build_app, launch_app
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService
from fcr_human_study.store import StudyStore
from PIL import Image, ImageFilter


def demo_results_store(root: Path) -> Path:
    from fcr_train.embedded import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    store_path = root / "fcr.duckdb"
    store = ResultsStore(store_path)
    for variation, smooth in (("fd5-baseline", False), ("fcr-l0.10-fd10", True)):
        cfg = {"variation": variation}
        samples = []
        for k in range(8):
            img = Image.fromarray(images[k]).convert("RGB")
            if smooth:
                img = img.resize((56, 56), Image.BICUBIC).filter(ImageFilter.SMOOTH).resize((28, 28))
            path = root / "samples" / variation / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
            samples.append(SampleRecord(prompt_id=f"p{k}",
                                        prompt=f"a photo of a {FASHION_MNIST_CLASSES[int(labels[k])].lower()}",
                                        seed=0, image_path=str(path), width=28, height=28))
        store.write_run(RunResult(RunRecord(
            run_id=make_run_id("demo", variation, 0, cfg), experiment_id="demo",
            variation_id=variation, seed=0, model="embedded", dataset="fashion-mnist",
            sampler="fd", scheduler="ddim", resolution=28, num_inference_steps=50,
            guidance_scale=3.0, config=cfg), samples=samples))
    return store_path


def main(out: str = "docs/human-study-rating.png") -> None:
    root = Path(tempfile.mkdtemp())
    study = root / "human-study.duckdb"
    build_study(demo_results_store(root), study, n_pairs=8, attention_share=0.0, pairs_per_rater=8)
    (_, token), = add_raters(study, 1)
    service = RatingService(StudyStore(study, idle_close_s=1.0))
    demo = build_app(service)
    _, url, _ = launch_app(demo, service, prevent_thread_lock=True, quiet=True)
    # Two votes first, so the progress bar shows some progress.
    rater = service.rater_for_token(token)
    for _ in range(2):
        service.vote(rater, service.current(rater).token, "left")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (apt-get install -y chromium)")
    subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=15000",
         f"--screenshot={Path(out).resolve()}", "--window-size=1280,1000", f"{url}?token={token}"],
        check=True, timeout=120,
    )
    demo.close()
    service.store.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
