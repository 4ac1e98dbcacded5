"""Screenshot of the rating page (docs/human-study-rating.png) with headless Chromium.

Builds a throw-away results store from Fashion-MNIST test images (two pretend variations: the
image and a lightly smoothed copy, as two samplers would give for one prompt and seed), builds a
study from it, starts the app on a free 127.0.0.1 port and opens an invitation link in the
Debian `chromium`, driven by Playwright (tests/apps/browser.py, shared with the browser tests).

    apt-get install -y chromium
    uv run python apps/human-study/scripts/screenshot_rating_page.py docs/human-study-rating.png
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from fcr_eval.store import ResultsStore, RunRecord, RunResult, SampleRecord, make_run_id
from fcr_human_study.app import build_app, launch_app
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService
from fcr_human_study.store import StudyStore
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the browser helper: test support
from tests.apps.browser import ChromiumMissing, find_chromium, free_port, open_chromium  # noqa: E402


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
    try:
        find_chromium()  # before building anything
    except ChromiumMissing as error:
        sys.exit(str(error))
    root = Path(tempfile.mkdtemp())
    study = root / "human-study.duckdb"
    build_study(demo_results_store(root), study, n_pairs=8, attention_share=0.0, pairs_per_rater=8)
    (_, token), = add_raters(study, 1)
    service = RatingService(StudyStore(study, idle_close_s=1.0))
    demo = build_app(service)
    _, url, _ = launch_app(demo, service, server_name="127.0.0.1", server_port=free_port(),
                           prevent_thread_lock=True, quiet=True)
    # Two votes first, so the progress bar shows some progress.
    rater = service.rater_for_token(token)
    for _ in range(2):
        service.vote(rater, service.current(rater).token, "left")
    try:
        with open_chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}?token={token}")
            # the invitation link lands on pair 3; wait for both images to have loaded
            page.locator("#progress-wrap", has_text="Pair 3 of 8").wait_for()
            page.wait_for_function("""() => {
              const imgs = [...document.querySelectorAll('#pair-row img')];
              return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""")
            page.wait_for_timeout(1000)  # let the layout settle
            Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=Path(out).resolve())
    finally:
        demo.close()
        service.store.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
