"""Doublethink models: tiny Mamba / GPT-2 from a config, or a local checkpoint cut to its first N layers.

Why cut: a pretrained mamba-130m (24 layers) or gpt2 cut to a few of its layers shows
how much hidden computation a shallow model manages. Checkpoints are
loaded with ``from_pretrained(path)`` (no hub here: give a local folder). On CPU the
Mamba mixers run ``hcr_kernels``' native selective scan and causal conv
(``apply_hcr_kernels_to_mamba``); on a GPU transformers' own path is left alone (it uses
``mamba-ssm`` / ``causal-conv1d`` when installed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, MambaConfig, MambaForCausalLM

from hcr.doublethink.config import ARCHITECTURES
from hcr_kernels import apply_hcr_kernels_to_mamba

__all__ = ["ARCHITECTURES", "build_model", "cut_layers", "load_pretrained_cut", "tiny_gpt2", "tiny_mamba"]

#: (attribute path of the block list, config fields holding the layer count)
_LAYER_LISTS = (
    ("backbone.layers", ("num_hidden_layers", "n_layer")),  # Mamba
    ("transformer.h", ("n_layer", "num_hidden_layers")),  # GPT-2
    ("gpt_neox.layers", ("num_hidden_layers",)),  # GPT-NeoX / Pythia
    ("model.layers", ("num_hidden_layers",)),  # Llama / Qwen2 style
)


def tiny_mamba(
    vocab_size: int, layers: int = 2, hidden: int = 64, state: int = 16, pad_token_id: int = 0, eos_token_id: int = 0
) -> MambaForCausalLM:
    """A from-scratch Mamba LM (about 60k parameters at the defaults with the built-in tokenizer)."""
    config = MambaConfig(
        vocab_size=vocab_size, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
        pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id, use_cache=False,
        tie_word_embeddings=True,
    )
    return MambaForCausalLM(config)


def tiny_gpt2(
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    positions: int = 256,
    pad_token_id: int = 0,
    eos_token_id: int = 0,
) -> GPT2LMHeadModel:
    """A from-scratch GPT-2 LM; ``positions`` bounds the sequence length (3n + 3 tokens for n operations)."""
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions,
        pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def _resolve(model: torch.nn.Module, dotted: str):
    for name in dotted.split("."):
        model = getattr(model, name, None)
        if model is None:
            return None
    return model


def cut_layers(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """Keep the first ``layers`` blocks of ``model`` (in place) and record it in the config; returns ``model``."""
    for dotted, fields in _LAYER_LISTS:
        blocks = _resolve(model, dotted)
        if isinstance(blocks, torch.nn.ModuleList):
            break
    else:
        raise ValueError(
            f"cannot find the layer list of a {type(model).__name__}; supported: {[d for d, _ in _LAYER_LISTS]}"
        )
    if not 1 <= layers <= len(blocks):
        raise ValueError(f"layers must be in [1, {len(blocks)}] for this {type(model).__name__}, got {layers}")
    parent_path, _, name = dotted.rpartition(".")
    setattr(_resolve(model, parent_path), name, blocks[:layers])
    for field in fields:
        if hasattr(model.config, field):
            setattr(model.config, field, layers)
    return model


def load_pretrained_cut(path: str | Path, layers: int, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` cut to its first ``layers`` blocks."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"pretrained path {str(path)!r} does not exist; give a local checkpoint folder (no model hub is reachable here)"
        )
    return cut_layers(AutoModelForCausalLM.from_pretrained(str(path), **kwargs), layers)


def build_model(
    arch: str,
    layers: int,
    vocab_size: int,
    *,
    pretrained: str | Path | None = None,
    hidden: int = 64,
    pad_token_id: int = 0,
    eos_token_id: int = 0,
    device: str | torch.device = "cpu",
    hcr_kernels: bool = True,
) -> torch.nn.Module:
    """The model of an experiment, on ``device``; Mamba on CPU uses hcr_kernels unless ``hcr_kernels=False``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if pretrained is not None:
        model = load_pretrained_cut(pretrained, layers)
        expected = "mamba" if arch == "mamba" else "gpt2"
        if model.config.model_type != expected:
            raise ValueError(f"--arch {arch} expects a {expected} checkpoint, {pretrained} holds {model.config.model_type}")
        if model.config.vocab_size < vocab_size:
            raise ValueError(
                f"the checkpoint's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's ({vocab_size}); "
                "use the tokenizer the checkpoint was trained with"
            )
    elif arch == "mamba":
        model = tiny_mamba(vocab_size, layers, hidden=hidden, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    else:
        model = tiny_gpt2(vocab_size, layers, hidden=hidden, pad_token_id=pad_token_id, eos_token_id=eos_token_id)
    model = model.to(device)
    if arch == "mamba" and hcr_kernels and torch.device(device).type == "cpu":
        apply_hcr_kernels_to_mamba(model)
    return model
