"""Two fine-tunes on one output folder: the second is refused, naming the first, and changes
nothing of what the first has written; the first finishes intact."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest
from fcr_common.locking import LockHeldError
from fcr_train.api import DataConfig, FinetuneConfig, finetune
from fcr_train.loss import FCRConfig
from fcr_train.trainer import OUTPUT_LOCK_NAME, TrainConfig


def _config(out: Path) -> FinetuneConfig:
    return FinetuneConfig(model="embedded-tiny", data=DataConfig(limit=32),
                          train=TrainConfig(output_dir=str(out), max_steps=3, batch_size=8, checkpoint_every=1,
                                            progress=False, fcr=FCRConfig(lam=0.1)))


FIRST = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_finetune_lock import _config
    from fcr_train.api import finetune

    out, release = Path(sys.argv[1]), Path(sys.argv[1]).with_name("release")

    def hold(step, logs):
        if step == 1:
            print("training", flush=True)
            while not release.exists():   # keep the folder busy until the test says so
                time.sleep(0.05)

    result = finetune(_config(out), step_callback=hold)
    print("done", result.steps, flush=True)
""")


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_finetune_on_the_same_folder_is_refused_and_changes_nothing(tmp_path, warm_runner):
    """The first fine-tune is a real process, forked from the ``warm_runner`` interpreter
    (``tests/warm.py``); the second runs here."""
    out = tmp_path / "run"
    first = warm_runner.start(None, [str(out), str(Path(__file__).parent)], code=FIRST,
                              env={"OMP_NUM_THREADS": "1"})
    try:
        line = next(first.stdout_lines(timeout=240), "").strip()
        assert line == "training", first.stderr if first.poll() is not None else line
        lock = json.loads((out / OUTPUT_LOCK_NAME).read_text())
        assert lock["pid"] == first.pid
        before = _snapshot(out)
        with pytest.raises(LockHeldError) as info:
            finetune(_config(out))
        assert f"training output folder {out} is in use by pid {first.pid}" in str(info.value)
        assert _snapshot(out) == before  # not one byte of the first run changed
    finally:
        (tmp_path / "release").touch()
    assert first.wait(240) == 0, first.stderr
    assert first.stdout.split() == ["training", "done", "3"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert not (out / OUTPUT_LOCK_NAME).exists()
    # with the folder free again, a later run (here: a resume) takes it
    cfg = _config(out)
    cfg.train.resume, cfg.train.max_steps = True, 4
    t0 = time.monotonic()
    assert finetune(cfg).steps == 4 and time.monotonic() - t0 < 120
