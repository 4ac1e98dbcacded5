"""What every benchmark script does with its command line (``sys.path`` import, as ``Report``).

* A bad value is refused **at the start**, before a model loads or a file is written, with one line
  ``<script>: error: <what is wrong>. <what to do>`` and exit code 2 (``--debug`` or ``FCR_DEBUG=1``
  adds the traceback): the argparse types of :mod:`fcr_common.cli_errors` for ranges, the checks
  here for outputs, :func:`run` around ``main``.
* Results never land on committed ones unless told: a benchmark that writes a folder of results
  defaults to a fresh ``runs/bench/<name>-<UTC time>/`` (:func:`output_folder`); an ``--out`` that
  already holds files is used only when passed explicitly, and the script says which files it
  replaces. An ``--out`` that should be a folder but is a file (or a report file that is a folder)
  is refused at the start.

Example::

    def main(argv=None) -> int:
        p = parser(__doc__)
        p.add_argument("--samples", type=int_at_least(1), default=32)
        p.add_argument("--out", type=Path, default=None)
        a = p.parse_args(argv)
        out = output_folder(a.out, "mechanism", ("rows.csv", "results.json"))
        ...

    if __name__ == "__main__":
        sys.exit(run(main))
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fcr_common.cli_errors import UserError, add_debug_argument, debug_requested, run_cli
from fcr_eval.cli import USER_ERRORS

__all__ = ["BENCH_ROOT", "UserError", "parser", "output_folder", "report_file", "run", "weights_architecture"]

#: Where a benchmark's results go unless ``--out`` says otherwise: ``runs/bench`` of the checkout
#: (ignored by git), or ``$FCR_BENCH_OUT``.
BENCH_ROOT = Path(os.environ.get("FCR_BENCH_OUT") or Path(__file__).resolve().parents[1] / "runs" / "bench")

def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the script's docstring as its description and ``--debug``."""
    p = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_argument(p)
    return p


def _prog() -> str:
    return Path(sys.argv[0]).name or "benchmark"


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None, *,
        user_errors: Mapping[str | type, int] | None = None) -> int:
    """Run ``main(argv)``: a :class:`UserError`, or a bad input ``fcr-eval`` names (an experiment
    file's error, a store's, a model that is not here), is one line and exit 2 (3: no model)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: main(args), prog=_prog(), debug=debug_requested("--debug" in args),
                   user_errors={**USER_ERRORS, **(user_errors or {})})


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_target(path: Path, flag: str) -> None:
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"{flag} {path}: {base} is a file, not a folder; pass a path in a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {base} is read-only; pass a path you can write")


def report_file(out: str | os.PathLike | None, flag: str = "--out") -> Path | None:
    """Check a report file's path at the start: not a folder, in a folder that exists or can be
    made; says so when it will replace a file. ``None`` stays ``None`` (print only)."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir() or os.fspath(out).endswith(("/", os.sep)):
        raise UserError(f"{flag} {out} is a folder; it takes the report's file, e.g. {path / 'report.md'}")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {out} is not a regular file; pass the report's file path")
    _check_writable_target(path, flag)
    if path.exists():
        print(f"{flag} {path} exists: the report replaces it when the benchmark finishes", file=sys.stderr)
    return path


def output_folder(out: str | os.PathLike | None, name: str, writes: Sequence[str] = (), *,
                  flag: str = "--out") -> Path:
    """The folder a benchmark writes its results to, checked at the start (nothing is created).

    Args:
        out: ``--out`` as given; ``None`` = a fresh ``runs/bench/<name>-<UTC time>`` folder.
        name: the benchmark's short name.
        writes: the files it writes there; an explicit ``out`` that holds any of them is used (the
            user named it) and the script says it replaces them.

    Raises:
        UserError: ``out`` is a file, or cannot be created or written.
    """
    if out is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = BENCH_ROOT / f"{name}-{stamp}"
        k = 1
        while path.exists():
            k += 1
            path = BENCH_ROOT / f"{name}-{stamp}-{k}"
        _check_writable_target(path, flag)
        print(f"results go to {path} (a new folder; pass {flag} to choose one)", file=sys.stderr)
        return path
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {out} is a file, not a folder; pass a folder for the results (a new one is made)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {out} is read-only; pass a folder you can write")
        replaced = [f for f in writes if (path / f).exists()]
        if replaced:
            print(f"{flag} {path} is an existing folder: this run replaces its {', '.join(replaced)}",
                  file=sys.stderr)
    else:
        _check_writable_target(path, flag)
    return path


# config.json keys that name the file, not the network.
_NOT_ARCHITECTURE = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def weights_architecture(folder: str | os.PathLike, flag: str = "weights") -> tuple[dict, str]:
    """Check a UNet weights folder (``save_pretrained`` layout) without loading a tensor, and say
    which network it is: ``config.json`` must be JSON and the weights file's safetensors header
    must read (a file cut short fails here, not after every model has loaded).

    Returns:
        The config, and a canonical text of its architecture (equal texts = one architecture,
        hence one cost per step).

    Raises:
        UserError: no such folder, no or unreadable ``config.json``, no or unreadable weights.
    """
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{flag} {path} is not a folder; pass a UNet folder saved by save_pretrained "
                        "(config.json + diffusion_pytorch_model.safetensors)")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{flag} {path} has no config.json; pass a UNet folder saved by save_pretrained "
                        "(e.g. a fine-tune's final_unet)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{flag} {path}/config.json is not readable JSON ({e})") from None
    weights = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not weights:
        raise UserError(f"{flag} {path} has no diffusion_pytorch_model.safetensors; pass a UNet folder saved by "
                        "save_pretrained")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors' error type is private to its Rust core
            raise UserError(f"{flag} {file} is cut off or not a safetensors file ({e})") from None
    shape = json.dumps({k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}, sort_keys=True)
    return config, shape
