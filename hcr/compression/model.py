"""The compression model: a frozen reasoning model reading pooled windows of its own thoughts.

``inputs_embeds`` are the base model's embeddings of the compressed sequence,
with every placeholder slot replaced by its pooled window (one fused
``hcr_kernels.pool_scatter``: mean over the pooler's last hidden states and the
scatter in one pass) and the block markers taken from the pooler's own table
(for a pooler with its own table; from the base's table for a pooler without one). The loss is
``hcr_kernels.fused_linear_cross_entropy`` on the base's last hidden states, so the
``[tokens, vocab]`` logits never exist during training.

Only the pooler trains. ``save_pretrained`` writes the config, the pooler and its
LoRA adapter, never the frozen base, which ``from_pretrained`` loads from the path
in the config (or takes as an argument). Saving is atomic: the files are written
into a temporary folder next to the target and moved into place, the config last,
so an interrupted save never leaves a folder that loads as if it were complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from hcr.argtypes import POSITIVE_INT
from hcr.compression.examples import window_tokens
from hcr.compression.pooler import EmbedPooler, quiet_peft_wrapping
from hcr.compression.tokens import CompressionTokens
from hcr.files import umask
from hcr_kernels import IGNORE_INDEX, fused_linear_cross_entropy, pool_scatter, window_mean_pool

POOLER_DIR, ADAPTER_DIR = "pooler", "pooler_adapter"
CONFIG_FILE = "config.json"  # written last: its presence marks a complete save


class CompressionConfig(PretrainedConfig):
    model_type = "hcr_compression"

    def __init__(self, base_model_name_or_path: str | None = None, window: int = 10, placeholder_id: int | None = None,
                 block_start_id: int | None = None, block_end_id: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.base_model_name_or_path = base_model_name_or_path
        self.window = window
        self.placeholder_id = placeholder_id
        self.block_start_id = block_start_id
        self.block_end_id = block_end_id

    @classmethod
    def for_tokens(cls, tokens: CompressionTokens, window: int, base_model_name_or_path: str | None = None):
        return cls(base_model_name_or_path, window, tokens.placeholder, tokens.block_start, tokens.block_end)


class CompressionModel(PreTrainedModel):
    config_class = CompressionConfig
    base_model_prefix = "pooler"
    supports_gradient_checkpointing = True

    def __init__(self, config: CompressionConfig, base: PreTrainedModel, pooler):
        super().__init__(config)
        if not POSITIVE_INT[0](config.window):
            raise ValueError(f"window must be a positive integer, got {config.window!r}")
        for name in ("placeholder_id", "block_start_id", "block_end_id"):
            token = getattr(config, name)
            if token is None or not 0 <= token < base.get_input_embeddings().num_embeddings:
                raise ValueError(f"config.{name}={token} is not a token of the base model "
                                 f"(vocab {base.get_input_embeddings().num_embeddings}): add the compression tokens")
        self.base = base
        self.pooler = pooler
        self.base.requires_grad_(False)
        self.base.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen: no dropout, whatever the trainer says
        return self

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def window_token_embeddings(self) -> torch.nn.Module:
        """The table the pooler reads window tokens and the block markers through: its own, else (a pooler
        without one) the base's."""
        own = self.pooler.get_input_embeddings()
        return own if own is not None else self.base.get_input_embeddings()

    def _window_hidden_states(self, window_ids: torch.Tensor) -> torch.Tensor:
        return self.pooler.window_hidden_states(window_embeds=self.window_token_embeddings()(window_ids))

    def pooled_windows(self, window_ids: torch.Tensor) -> torch.Tensor:
        """The vector each window ``[N, W]`` is compressed into, ``[N, hidden]`` (what a slot receives)."""
        return window_mean_pool(self._window_hidden_states(window_ids))

    def compressed_embeddings(self, input_ids: torch.Tensor, window_ids: torch.Tensor,
                              slot_mask: torch.Tensor | None = None, window_hidden=None) -> torch.Tensor:
        """``inputs_embeds`` of a compressed batch: ``input_ids [B, T]``, ``window_ids [N, W]``.

        ``window_hidden``: a function giving the pooler's last hidden states ``[N, W, H]`` of
        ``window_ids`` in its place (a generator's native pooling); by default the pooler's forward."""
        if window_ids.dim() != 2 or window_ids.shape[1] != self.config.window:
            raise ValueError(f"window_ids must be [N, window={self.config.window}], got {tuple(window_ids.shape)}")
        if slot_mask is None:
            slot_mask = input_ids == self.config.placeholder_id
        template = self.base.get_input_embeddings()(input_ids)
        markers = (input_ids == self.config.block_start_id) | (input_ids == self.config.block_end_id)
        # Branch-free (no `if markers.any()`, no boolean indexing): a data-dependent branch or size would break
        # a torch.compile graph, and one more [B, T] gather is cheap next to the base model. Non-marker tokens
        # look up a marker id, so the marker table needs no rows beyond the markers; torch.where is exact.
        marker_ids = torch.where(markers, input_ids, self.config.block_start_id)
        marker_embeds = self.window_token_embeddings()(marker_ids).to(template.dtype)
        template = torch.where(markers.unsqueeze(-1), marker_embeds, template)
        hidden = (window_hidden or self._window_hidden_states)(window_ids).to(template.dtype)
        return pool_scatter(template, slot_mask, hidden)

    def windows_from_aligned(self, replaced_original_tokens: torch.Tensor, original_tokens: torch.Tensor) -> torch.Tensor:
        """From the aligned views: the real tokens under the placeholders of ``replaced_original_tokens``."""
        return window_tokens(replaced_original_tokens, original_tokens, self.config.placeholder_id, self.config.window)

    def forward(self, input_ids=None, attention_mask=None, labels=None, slot_mask=None, window_ids=None,
                compressed_input_ids=None, replaced_original_tokens=None, original_tokens=None,
                return_logits: bool | None = None, num_items_in_batch=None, **kwargs):
        """A compressed batch (``input_ids``, ``window_ids``, optional ``slot_mask``) or the three aligned
        sequences (``compressed_input_ids``, ``replaced_original_tokens``, ``original_tokens``). With ``labels`` the loss is computed without materialising the logits unless
        ``return_logits``; without labels the logits are returned.

        The loss is the mean over this batch's supervised tokens, or, with ``num_items_in_batch``
        (which the Trainer passes: the supervised tokens of the whole optimizer step, over gradient
        accumulation and every data-parallel rank), their sum divided by it, so that the step's
        gradient is the mean over all of its tokens however the batch is split."""
        if compressed_input_ids is not None:
            input_ids = compressed_input_ids
            window_ids = self.windows_from_aligned(replaced_original_tokens, original_tokens)
        if input_ids is None or window_ids is None:
            raise ValueError("pass input_ids and window_ids, or compressed_input_ids, replaced_original_tokens "
                             "and original_tokens")
        if slot_mask is None:
            slot_mask = input_ids == self.config.placeholder_id
            if attention_mask is not None:
                slot_mask &= attention_mask.bool()
        embeds = self.compressed_embeddings(input_ids, window_ids, slot_mask)
        if labels is None or return_logits:
            loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            out = self.base(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False,
                            **(loss_kwargs if labels is not None else {}))
            return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
        hidden = self.base.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state
        head = self.base.get_output_embeddings()
        loss = fused_linear_cross_entropy(
            hidden[:, :-1].reshape(-1, hidden.shape[-1]), head.weight, labels[:, 1:].reshape(-1),
            bias=head.bias,
        )
        if num_items_in_batch is not None:  # mean over this batch -> its share of the step's mean
            kept = (labels[:, 1:] != IGNORE_INDEX).sum().to(loss.dtype)
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(device=loss.device, dtype=loss.dtype)
            loss = loss * kept / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss, logits=None)

    @property
    def has_adapter(self) -> bool:
        """Whether the pooler carries a LoRA adapter (peft wraps it) rather than being a plain pooler."""
        return hasattr(self.pooler, "peft_config")

    def merge_adapter(self) -> "CompressionModel":
        """Fold the pooler's LoRA adapter into its weights, for inference; returns ``self``.

        Generation runs the pooler on every compressed window, and an unmerged LoRA projection is
        three matmuls, a scaling and an add where a merged one is one matmul. The merged pooler
        equals the adapted one up to rounding; it has no adapter left to train, and a save holds
        the merged weights as a pooler without an adapter. Without an adapter nothing changes.
        """
        if self.has_adapter:
            self.pooler = self.pooler.merge_and_unload()
        return self

    # ------------------------------------------------------------- saving

    def save_pretrained(self, save_directory, state_dict=None, is_main_process: bool = True, **kwargs):
        """Config, pooler and LoRA adapter; the frozen base is not re-saved. Atomic, see ``_install``.

        ``is_main_process=False`` (the Trainer's other data-parallel ranks) writes nothing.
        ``state_dict`` and the other keywords of ``PreTrainedModel.save_pretrained`` are accepted for
        the Trainer's sake and ignored: the pooler's own modules are saved.
        """
        if not is_main_process:
            return
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            self._write(staging)
            _install(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write(self, directory: Path) -> None:
        pooler, weights = self.pooler, None
        if self.has_adapter:
            # Said, not left to peft's "auto" (which warns each save that it chose to save them): the token
            # table goes into the adapter exactly when LoRA adapts it.
            adapted = pooler.peft_config[pooler.active_adapter].target_modules or ()
            pooler.save_pretrained(str(directory / ADAPTER_DIR), save_embedding_layers="embed_tokens" in adapted)
            pooler = pooler.get_base_model()
            # the pooler's own weights, without the LoRA layers peft injected into it
            weights = {k.replace(".base_layer", ""): v for k, v in pooler.state_dict().items() if "lora_" not in k}
        pooler.save_pretrained(str(directory / POOLER_DIR), state_dict=weights)
        self.config.save_pretrained(str(directory))

    def load_pooler_state(self, path) -> None:
        """Copy the pooler (and adapter) weights saved at ``path`` into this model, in place.

        For resuming: the optimizer keeps pointing at the same parameters. The saved model must have
        this model's window and the same LoRA layout.
        """
        config = _saved_config(str(path))
        if config.window != self.config.window:
            raise ValueError(f"{path} holds a pooler for windows of {config.window}, this model's window is "
                             f"{self.config.window}")
        saved_adapter = (Path(path) / ADAPTER_DIR).is_dir()
        if saved_adapter != self.has_adapter:
            raise ValueError(f"{path} holds a pooler {'with' if saved_adapter else 'without'} a LoRA adapter, this "
                             f"model's pooler has {'one' if self.has_adapter else 'none'}")
        saved = type(self).from_pretrained(path, base_model=self.base, is_trainable=True)
        self.pooler.load_state_dict(saved.pooler.state_dict())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, base_model=None, is_trainable=False, **kwargs):
        """Load a saved compression model; the base comes from ``base_model`` or the config's path."""
        path = str(pretrained_model_name_or_path)
        config = _saved_config(path)
        if base_model is None:
            if not config.base_model_name_or_path:
                raise ValueError("the config names no base model: pass base_model=")
            base_model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path)
        pooler = EmbedPooler.from_pretrained(os.path.join(path, POOLER_DIR))
        adapter = os.path.join(path, ADAPTER_DIR)
        if os.path.isdir(adapter):
            from peft import PeftModel

            with quiet_peft_wrapping():
                pooler = PeftModel.from_pretrained(pooler, adapter, is_trainable=is_trainable)
        return cls(config, base_model, pooler)


def _saved_config(path: str) -> CompressionConfig:
    """The config of a complete save. Checked here because transformers returns a default config
    for a folder without one, and a missing config is what marks an unfinished save."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise FileNotFoundError(f"{path} holds no complete compression model: {CONFIG_FILE} is missing "
                                "(not a save, or an interrupted one)")
    return CompressionConfig.from_pretrained(path)


def _install(staging: Path, target: Path) -> None:
    """Move a complete save from ``staging`` into ``target`` so that no interruption leaves a loadable half.

    A new target is the staging folder renamed (one atomic step). An existing one (the Trainer
    creates its folders first; a user's output folder may hold other files, which are kept) loses
    its config first, which makes it unloadable; then the pooler and adapter folders are swapped in
    (a stale adapter of an earlier save is removed), and the config is moved in last. Each move is
    an ``os.replace`` within one file system. This guards against a failing or killed process, not
    against power loss (nothing is fsynced).
    """
    if not target.exists():
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private; a save folder is not
        try:
            os.replace(staging, target)
            return
        except OSError:  # created meanwhile by someone else: install file by file below
            if not target.is_dir():
                raise
    if not target.is_dir():
        raise NotADirectoryError(f"cannot save into {target}: it is not a directory")
    old = staging / ".replaced"
    old.mkdir()
    if (target / CONFIG_FILE).exists():
        os.replace(target / CONFIG_FILE, old / CONFIG_FILE)
    for name in (POOLER_DIR, ADAPTER_DIR):
        if (target / name).exists():
            os.replace(target / name, old / name)
        if (staging / name).exists():
            os.replace(staging / name, target / name)
    os.replace(staging / CONFIG_FILE, target / CONFIG_FILE)
