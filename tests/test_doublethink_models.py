"""Models: tiny Mamba / GPT-2, checkpoints cut to their first N layers, hcr_kernels on CPU Mamba."""

import pytest
import torch

from hcr.doublethink.models import build_model, cut_layers, load_pretrained_cut, tiny_gpt2, tiny_mamba


def mixers(model):
    return [m for m in model.modules() if type(m).__name__ == "MambaMixer"]


@pytest.mark.parametrize("make, blocks", [(tiny_mamba, "backbone.layers"), (tiny_gpt2, "transformer.h")], ids=["mamba", "gpt2"])
def test_checkpoint_is_cut_to_its_first_layers(tmp_path, make, blocks):
    full = make(16, layers=4, hidden=32)
    full.save_pretrained(tmp_path)
    cut = load_pretrained_cut(tmp_path, 2)
    parent, name = blocks.split(".")
    assert len(getattr(getattr(cut, parent), name)) == 2
    assert cut.config.num_hidden_layers == 2
    kept = {k: v for k, v in full.state_dict().items() if not any(f"{name}.{i}." in k for i in (2, 3))}
    assert set(cut.state_dict()) == set(kept)
    for key, value in cut.state_dict().items():
        assert torch.equal(value, kept[key]), key
    # the cut model computes what the full model's first two blocks compute
    setattr(getattr(full, parent), name, torch.nn.ModuleList(list(getattr(getattr(full, parent), name))[:2]))
    ids = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, full(input_ids=ids).logits)
    with pytest.raises(ValueError, match=r"layers must be in \[1, 2\]"):
        cut_layers(cut, 3)
    with pytest.raises(FileNotFoundError, match="pretrained path"):
        load_pretrained_cut(tmp_path / "missing", 1)


def test_build_model_checks_the_checkpoint_kind(tmp_path):
    tiny_gpt2(16, layers=2, hidden=32).save_pretrained(tmp_path)
    assert build_model("transformer", 1, 16, pretrained=tmp_path).config.n_layer == 1
    with pytest.raises(ValueError, match="--arch mamba expects a mamba checkpoint"):
        build_model("mamba", 1, 16, pretrained=tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        build_model("transformer", 1, 64, pretrained=tmp_path)
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("rwkv", 1, 16)


def test_cpu_mamba_uses_hcr_kernels_by_default_and_matches_transformers():
    torch.manual_seed(0)
    patched = build_model("mamba", 2, 16, hidden=32)
    assert mixers(patched) and all(hasattr(m, "_hcr_original_forward") for m in mixers(patched))
    plain = build_model("mamba", 2, 16, hidden=32, hcr_kernels=False)
    assert not any(hasattr(m, "_hcr_original_forward") for m in mixers(plain))
    plain.load_state_dict(patched.state_dict())
    ids = torch.randint(0, 16, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
