"""The embed pooler and the compression model: splice, loss, LoRA training, save/load, CLI."""

from __future__ import annotations

import json
import os
import random
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from hcr.compression import (  # noqa: E402
    CompressionCollator,
    CompressionExampleDataset,
    CompressionTokens,
    ExampleConfig,
    arithmetic_trace,
    tiny_tokenizer,
    tokenize_trace,
)
from hcr.compression.model import CompressionModel  # noqa: E402
from hcr.compression.pooler import EmbedPooler  # noqa: E402
from hcr.compression.train import (  # noqa: E402
    LoraSettings,
    PoolerSettings,
    TrainSettings,
    build_compression_model,
    train_compressor,
)

WINDOW = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def traces(tokenizer):
    return [tokenize_trace(tokenizer, *arithmetic_trace(random.Random(i))) for i in range(24)]


@pytest.fixture(scope="module")
def base(tokenizer, traces):
    """A tiny Qwen2 trained briefly on the uncompressed traces, so it has something to lose."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                      max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    width = max(len(t.ids) for t in traces)
    ids = torch.full((len(traces), width), tokenizer.pad_token_id)
    labels = torch.full((len(traces), width), -100)
    for row, trace in enumerate(traces):
        ids[row, : len(trace.ids)] = torch.from_numpy(trace.ids)
        labels[row, : len(trace.ids)] = torch.from_numpy(trace.ids)
    for _ in range(60):
        model(ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def batch_of(tokenizer, traces, count=4):
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    dataset = CompressionExampleDataset(traces[:6], tokens, ExampleConfig(window=WINDOW, every_nth=3))
    return CompressionCollator(tokens, WINDOW, tokenizer.pad_token_id)([dataset[i] for i in range(count)])


def seed_embeddings(model: CompressionModel, batch) -> torch.Tensor:
    """The seed's splice: mean-pool, then two masked_scatters (slots, then markers)."""
    config = model.config
    ids = batch["input_ids"]
    template = model.base.get_input_embeddings()(ids)
    pooled = model.pooler.window_hidden_states(batch["window_ids"]).mean(1).to(template.dtype)
    slots = (ids == config.placeholder_id).unsqueeze(-1).expand_as(template)
    template = template.masked_scatter(slots, pooled)
    markers = (ids == config.block_start_id) | (ids == config.block_end_id)
    marker_embeds = model.pooler.get_input_embeddings()(ids[markers]).to(template.dtype)
    return template.masked_scatter(markers.unsqueeze(-1).expand_as(template), marker_embeds)


def test_fused_splice_equals_the_seeds_two_masked_scatters(tokenizer, traces, base):
    model = build_compression_model(base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1), lora=None)
    batch = batch_of(tokenizer, traces)
    ours = model.compressed_embeddings(batch["input_ids"], batch["window_ids"])
    seed = seed_embeddings(model, batch)
    torch.testing.assert_close(ours, seed, atol=1e-6, rtol=1e-5)
    grads = []
    for embeds in (ours, seed):
        out = model.base(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
        grads.append((out.loss, torch.autograd.grad(out.loss, list(model.pooler.parameters()), allow_unused=True)))
    (loss, grad), (seed_loss, seed_grad) = grads
    torch.testing.assert_close(loss, seed_loss)
    for a, b in zip(grad, seed_grad):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_fused_loss_equals_the_base_models_loss(tokenizer, traces, base):
    model = build_compression_model(base, tokenizer, WINDOW, lora=LoraSettings(r=4, alpha=4))
    batch = batch_of(tokenizer, traces)
    fused = model(**batch)
    full = model(**batch, return_logits=True)
    assert fused.logits is None and full.logits.shape[:2] == batch["input_ids"].shape
    torch.testing.assert_close(fused.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_seed_format_gives_the_same_loss(tokenizer, traces, base):
    model = build_compression_model(base, tokenizer, WINDOW, lora=None)
    tokens = CompressionTokens.from_tokenizer(tokenizer)
    example = CompressionExampleDataset(traces[:1], tokens, ExampleConfig(window=WINDOW))[2]
    as_tensors = {k: torch.from_numpy(v).unsqueeze(0) for k, v in example.items()}
    seed_format = model(compressed_input_ids=as_tensors["compressed_input_ids"],
                        replaced_original_tokens=as_tensors["replaced_original_tokens"],
                        original_tokens=as_tensors["original_tokens"], labels=as_tensors["labels"])
    batch = CompressionCollator(tokens, WINDOW, tokenizer.pad_token_id)([example])
    torch.testing.assert_close(seed_format.loss, model(**batch).loss)


def test_training_lowers_the_loss_and_leaves_the_base_untouched(tokenizer, traces, base, tmp_path):
    import datasets

    before = {name: p.detach().clone() for name, p in base.state_dict().items()}
    model = build_compression_model(base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1),
                                    lora=LoraSettings(r=8, alpha=16))
    batch = batch_of(tokenizer, traces, count=8)
    with torch.no_grad():
        initial = model(**batch).loss.item()
    pairs = [arithmetic_trace(random.Random(i)) for i in range(24)]
    data = datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [a for _, a in pairs]})
    settings = TrainSettings(output_dir=str(tmp_path / "run"), max_steps=40, per_device_train_batch_size=8,
                             gradient_accumulation_steps=1, learning_rate=3e-3, report_to="none", save_steps=1000,
                             logging_steps=10)
    trainer = train_compressor(model, tokenizer, data, examples=ExampleConfig(window=WINDOW, every_nth=2),
                               settings=settings)
    with torch.no_grad():
        final = model(**batch).loss.item()
    assert final < initial - 0.05, (initial, final, trainer.state.log_history)
    after = base.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "the frozen base changed"

    # save -> load gives identical logits; the base is not in the saved folder
    saved = tmp_path / "run"
    assert (saved / "pooler").is_dir() and (saved / "pooler_adapter").is_dir()
    assert not any("lm_head" in p.name for p in saved.rglob("*.safetensors"))
    loaded = CompressionModel.from_pretrained(saved, base_model=base).eval()
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "window_ids")}
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param(PoolerSettings(own_embeddings=False), id="V1-base-embeddings"),
        pytest.param(PoolerSettings(projection=True), id="V3-projection"),
        pytest.param(PoolerSettings(num_hidden_layers=1, from_base_weights=False), id="V5-one-layer-random"),
    ],
)
def test_pooler_variants(tokenizer, traces, base, settings):
    model = build_compression_model(base, tokenizer, WINDOW, pooler=settings, lora=None)
    batch = batch_of(tokenizer, traces)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.pooler.parameters())
    assert all(p.grad is None for p in model.base.parameters())
    if settings.projection:  # starts as the identity: the pooled vector is the plain mean
        pooler = model.pooler
        hidden = pooler.model(inputs_embeds=pooler.get_input_embeddings()(batch["window_ids"])).last_hidden_state
        torch.testing.assert_close(pooler(batch["window_ids"]), hidden.mean(1), atol=1e-6, rtol=1e-5)


def test_pooler_from_base_copies_its_layers(base):
    pooler = EmbedPooler.from_base(base, num_hidden_layers=1)
    assert pooler.config.num_hidden_layers == 1
    assert torch.equal(pooler.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(pooler.get_input_embeddings().weight, base.get_input_embeddings().weight)


def test_a_pooler_deeper_than_its_base_is_random_or_refused(base):
    """Copying the base's weights needs a base layer per pooler layer; a random pooler may be deeper, its layer
    kinds going on as the base's last one (transformers refuses a config whose layer_types are too few)."""
    layers = base.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"num_hidden_layers \(--pooler-layers\) = {layers + 2}, but the base has "
                                         rf"{layers} layers to copy: choose at most {layers}, or a random"):
        EmbedPooler.from_base(base, num_hidden_layers=layers + 2)
    deeper = EmbedPooler.from_base(base, num_hidden_layers=layers + 2, copy_weights=False)
    assert len(deeper.model.layers) == layers + 2
    kinds = getattr(base.config, "layer_types", None)
    if kinds:
        assert deeper.config.layer_types == kinds + kinds[-1:] * 2


def test_a_window_must_be_a_positive_integer_and_a_tokenizer_a_tokenizer(tokenizer, base):
    with pytest.raises(ValueError, match="window must be a positive integer, got 2.5"):
        build_compression_model(base, tokenizer, 2.5, lora=None)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer .*, got NoneType"):
        build_compression_model(base, None, 2, lora=None)


def test_bad_input_is_named(tokenizer, traces, base):
    model = build_compression_model(base, tokenizer, WINDOW, lora=None)
    batch = batch_of(tokenizer, traces)
    with pytest.raises(ValueError, match=f"window_ids must be \\[N, window={WINDOW}\\]"):
        model(input_ids=batch["input_ids"], window_ids=batch["window_ids"][:, :2])
    with pytest.raises(ValueError, match="True slots but hidden has N="):
        model(input_ids=batch["input_ids"], window_ids=batch["window_ids"][:-1])
    small = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32))
    with pytest.raises(ValueError, match="is not a token of the base model"):
        build_compression_model(small, tokenizer, WINDOW, lora=None)
    with pytest.raises(ValueError, match="examples.window=3 but the model compresses windows of 4"):
        train_compressor(model, tokenizer, [], examples=ExampleConfig(window=3))


def test_command_line_trains_and_saves(tokenizer, base, tmp_path):
    from hcr.cli import main

    base_dir, data_file, out = tmp_path / "base", tmp_path / "traces.jsonl", tmp_path / "out"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    with data_file.open("w") as f:
        for i in range(8):
            question, answer = arithmetic_trace(random.Random(100 + i))
            f.write(json.dumps({"question": question, "answer": answer}) + "\n")
    code = main(["train-compressor", "--base", str(base_dir), "--dataset", str(data_file), "--output-dir", str(out),
                 "--window", "4", "--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--report-to", "none",
                 "--pooler-layers", "1", "--lora-r", "4", "--gradient-checkpointing"])
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["window"] == 4 and config["base_model_name_or_path"] == str(base_dir)
    loaded = CompressionModel.from_pretrained(out)  # the base comes from the path in the config
    assert loaded.config.window == 4


def test_an_interrupted_save_never_loads_as_if_complete(tokenizer, base, tmp_path, monkeypatch):
    """A save fails while writing or while moving into place: the folder then loads the previous
    complete save or not at all, never a mix; a user's other files in it survive."""
    model = build_compression_model(base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1),
                                    lora=LoraSettings(r=4, alpha=4))
    target = tmp_path / "saved"

    def state_of(pooler):
        return {name: tensor.detach().clone() for name, tensor in pooler.state_dict().items()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    def train_a_bit():  # new weights everywhere, so a mix of two saves would show
        with torch.no_grad():
            for parameter in model.pooler.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter))
        return state_of(model.pooler)

    def loads(expected):
        loaded = CompressionModel.from_pretrained(target, base_model=base)
        got = state_of(loaded.pooler)
        return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    # the pooler's weights are written after the adapter: failing there leaves no folder at all
    with monkeypatch.context() as patch:
        patch.setattr(EmbedPooler, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(target)
    assert list(tmp_path.iterdir()) == []

    # the other ranks of a data-parallel run write nothing
    model.save_pretrained(target, is_main_process=False)
    assert list(tmp_path.iterdir()) == []

    # a complete save, with a user's file beside it; a second save failing while writing keeps the first
    old = train_a_bit()
    model.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    train_a_bit()
    with monkeypatch.context() as patch:
        patch.setattr(EmbedPooler, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(target)
    assert loads(old)

    # a save killed at each step of moving the files into place: the old save or nothing, never a mix
    real_replace, moves = os.replace, []
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", lambda src, dst: (moves.append(dst), real_replace(src, dst)))
        model.save_pretrained(target)
    assert len(moves) >= 4
    for failing in range(1, len(moves) + 1):
        old = train_a_bit()
        model.save_pretrained(target)
        assert loads(old)
        new, calls = train_a_bit(), []

        def killed(src, dst, failing=failing, calls=calls):
            calls.append(dst)
            if len(calls) == failing:
                raise OSError("killed")
            real_replace(src, dst)

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", killed)
            with pytest.raises(OSError, match="killed"):
                model.save_pretrained(target)
        try:
            intact = loads(old)
        except OSError:  # does not load at all: fine
            intact = True
        assert intact, f"killed at move {failing} of {len(moves)}: the folder loads, but not the old save"
        assert (target / "notes.txt").read_text() == "mine"
    model.save_pretrained(target)
    assert loads(new) and (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no staging folder left behind


def test_loss_normalised_by_the_steps_token_count(tokenizer, traces, base):
    """With the Trainer's ``num_items_in_batch`` (all supervised tokens of the optimizer step, over
    gradient accumulation and data-parallel ranks) the loss is this batch's sum over that count."""
    model = build_compression_model(base, tokenizer, WINDOW, lora=None)
    batch = batch_of(tokenizer, traces)
    kept = int((batch["labels"][:, 1:] != -100).sum())
    mean = model(**batch).loss
    for return_logits in (False, True):
        share = model(**batch, num_items_in_batch=torch.tensor(3 * kept), return_logits=return_logits).loss
        torch.testing.assert_close(share, mean / 3, atol=1e-6, rtol=1e-5)


def test_merged_adapter_pools_as_the_adapted_pooler(tokenizer, traces, base, tmp_path):
    """merge_adapter folds LoRA into the pooler's weights: a plain pooler whose windows and splice equal
    the adapted one's up to fp32 rounding, and whose save loads back bit for bit."""
    model = build_compression_model(base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1),
                                    lora=LoraSettings(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give every adapter something to contribute
        for name, parameter in model.pooler.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    model.eval()
    batch = batch_of(tokenizer, traces)
    with torch.no_grad():
        adapted_windows = model.pooled_windows(batch["window_ids"])
        adapted_embeds = model.compressed_embeddings(batch["input_ids"], batch["window_ids"])
        with model.pooler.disable_adapter():
            unadapted = model.pooled_windows(batch["window_ids"])
    assert (adapted_windows - unadapted).abs().max() > 1e-2  # the adapter matters, so the merge is tested

    assert model.merge_adapter() is model
    assert type(model.pooler) is EmbedPooler and not any("lora_" in n for n, _ in model.pooler.named_parameters())
    with torch.no_grad():
        merged_windows = model.pooled_windows(batch["window_ids"])
        merged_embeds = model.compressed_embeddings(batch["input_ids"], batch["window_ids"])
    # one matmul with W + sBA instead of W x + s B(A x): fp32 rounding of reductions over hidden 48 / rank 4
    torch.testing.assert_close(merged_windows, adapted_windows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_embeds, adapted_embeds, rtol=1e-5, atol=1e-5)

    state = {k: v.clone() for k, v in model.pooler.state_dict().items()}
    assert model.merge_adapter() is model  # nothing left to merge: unchanged
    assert all(torch.equal(v, model.pooler.state_dict()[k]) for k, v in state.items())
    model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "pooler_adapter").exists()
    loaded = CompressionModel.from_pretrained(tmp_path / "merged", base_model=base).eval()
    with torch.no_grad():
        assert torch.equal(loaded.pooled_windows(batch["window_ids"]), merged_windows)


def test_lora_pooler_of_a_tied_base_builds_saves_loads_and_merges_without_library_warnings(tokenizer, tmp_path):
    """The warnings peft and transformers gave on every demo run, none of them the user's to act on: the
    deprecated ``is_gradient_checkpointing`` read by peft, "save_embedding_layers set to True" on every
    save, and LoRA on tied embeddings (the pooler has no head to tie; its base here has). The adapter
    still saves the adapted token table."""
    from safetensors import safe_open

    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    tied_base = transformers.Qwen2ForCausalLM(config)
    noise = ("is_gradient_checkpointing", "save_embedding_layers", "tie_word_embeddings")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build_compression_model(tied_base, tokenizer, WINDOW, pooler=PoolerSettings(num_hidden_layers=1),
                                        lora=LoraSettings(r=4, alpha=8))
        model.save_pretrained(tmp_path / "saved")
        loaded = CompressionModel.from_pretrained(tmp_path / "saved", base_model=tied_base)
        loaded.merge_adapter()
    assert [str(w.message)[:100] for w in caught if any(n in str(w.message) for n in noise)] == []
    with safe_open(str(tmp_path / "saved" / "pooler_adapter" / "adapter_model.safetensors"), "pt") as saved:
        assert any("embed_tokens" in key and "lora_" in key for key in saved.keys())


def test_gradient_checkpointing_reaches_the_trainer_under_the_installed_transformers_name(tmp_path):
    """transformers 5 renamed TrainingArguments' gradient_checkpointing to activation_checkpointing and warns
    on the old name; hcr's setting (and --gradient-checkpointing) passes whichever this transformers has."""
    for wanted in (True, False):
        settings = TrainSettings(output_dir=str(tmp_path / "out"), report_to="none", gradient_checkpointing=wanted)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = settings.training_arguments()
        assert args.gradient_checkpointing is wanted
        assert getattr(args, "activation_checkpointing", wanted) is wanted


def test_the_package_names_everything_to_train_a_pooler():
    """``hcr.compression`` (as the README says) and the top level give the same objects as their modules."""
    import hcr
    import hcr.compression as package
    from hcr.compression import model, pooler, settings, train

    for module in (model, pooler, settings, train):
        for name in set(package.__all__) & set(vars(module)):
            assert getattr(package, name) is getattr(module, name), name
    assert {"CompressionModel", "EmbedPooler", "train_compressor", "TrainSettings", "load_traces"} <= set(package.__all__)
    assert hcr.CompressionModel is package.CompressionModel
    with pytest.raises(AttributeError, match="has no attribute 'CompressionMode'"):
        package.CompressionMode
