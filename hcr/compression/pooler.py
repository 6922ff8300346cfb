"""The embed pooler: a small Qwen2 stack that turns each window of W tokens into one vector.

It embeds the window's tokens, runs them through its decoder layers and
mean-pools the last hidden states. Its variants are options of one class, not
copies of it:

* ``own_embeddings`` (default): the pooler has its own (trainable) token table;
  without it the caller passes the base model's embeddings.
* ``projection``: an extra bias-free ``hidden x hidden`` map after the stack.
* ``num_hidden_layers`` of the pooler's own config: fewer layers than the base.

``EmbedPooler.from_base`` initialises it from a base model's weights (its first
layers and its embedding table).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2Model, Qwen2PreTrainedModel

from hcr_kernels import window_mean_pool


class EmbedPoolerConfig(Qwen2Config):
    model_type = "hcr_embed_pooler"

    def __init__(self, own_embeddings: bool = True, projection: bool = False, **kwargs):
        # The pooler has no output head, so nothing of it is tied to its token table, whatever the base's
        # config said (peft warns that LoRA on tied embeddings may break a merge when this is left True).
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
        self.own_embeddings = own_embeddings
        self.projection = projection


class EmbedPooler(Qwen2PreTrainedModel):
    config_class = EmbedPoolerConfig
    base_model_prefix = "pooler"

    def __init__(self, config: EmbedPoolerConfig):
        super().__init__(config)
        self.model = Qwen2Model(config)
        if not config.own_embeddings:
            self.model.embed_tokens = None
        self.projection = nn.Linear(config.hidden_size, config.hidden_size, bias=False) if config.projection else None
        self.post_init()

    @classmethod
    def from_base(cls, base_model, *, num_hidden_layers: int | None = None, own_embeddings: bool = True,
                  projection: bool = False, copy_weights: bool = True) -> "EmbedPooler":
        """A pooler with the base's architecture (cut to ``num_hidden_layers``) and, by default, its weights."""
        base_config = base_model.config.to_dict()
        for key in ("architectures", "model_type", "transformers_version"):
            base_config.pop(key, None)
        base_layers = base_config["num_hidden_layers"]
        if num_hidden_layers is not None:
            if copy_weights and num_hidden_layers > base_layers:
                raise ValueError(f"the pooler's num_hidden_layers (--pooler-layers) = {num_hidden_layers}, but the base "
                                 f"has {base_layers} layers to copy: choose at most {base_layers}, or a random "
                                 f"initialisation (copy_weights=False, --random-init)")
            base_config["num_hidden_layers"] = num_hidden_layers
            if base_config.get("layer_types"):  # a deeper random pooler repeats the base's last kind of layer
                kinds = base_config["layer_types"]
                base_config["layer_types"] = (kinds + kinds[-1:] * num_hidden_layers)[:num_hidden_layers]
        config = EmbedPoolerConfig(own_embeddings=own_embeddings, projection=projection, **base_config)
        pooler = cls(config).to(base_model.dtype)
        if not copy_weights:
            return pooler
        decoder_state = base_model.get_decoder().state_dict()
        missing, unexpected = pooler.model.load_state_dict(
            {k: v for k, v in decoder_state.items() if own_embeddings or not k.startswith("embed_tokens")}, strict=False
        )
        layer_missing = [k for k in missing if not k.startswith("embed_tokens")]
        if layer_missing:
            raise ValueError(f"the base model's decoder lacks weights the pooler needs: {layer_missing[:5]}")
        if projection:
            nn.init.eye_(pooler.projection.weight)  # start as the identity: the base's own representation
        return pooler

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def window_hidden_states(self, window_ids: torch.Tensor | None = None,
                             window_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states ``[N, W, H]`` of the windows (ids ``[N, W]``, or the base's embeddings of them)."""
        if (window_ids is None) == (window_embeds is None):
            raise ValueError("pass exactly one of window_ids and window_embeds")
        if window_embeds is None:
            if self.model.embed_tokens is None:
                raise ValueError("this pooler has no token table (own_embeddings=False): pass window_embeds")
            window_embeds = self.model.embed_tokens(window_ids)
        if window_embeds.shape[0] == 0:
            return window_embeds
        hidden = self.model(inputs_embeds=window_embeds, use_cache=False).last_hidden_state
        return self.projection(hidden) if self.projection is not None else hidden

    def forward(self, window_ids: torch.Tensor | None = None, window_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per window: ``[N, W] -> [N, H]`` (mean of the last hidden states)."""
        return window_mean_pool(self.window_hidden_states(window_ids, window_embeds))


@contextmanager
def quiet_peft_wrapping():
    """For wrapping the pooler in peft: peft 0.21 reads transformers' deprecated
    ``is_gradient_checkpointing`` each time it wraps a model, and transformers 5 warns about it
    each time, a FutureWarning nobody using hcr can act on. Only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
