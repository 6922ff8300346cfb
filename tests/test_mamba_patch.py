"""apply_hcr_kernels_to_mamba: a transformers Mamba computes the same thing, faster.

The patched model must give the unpatched model's logits and gradients, follow
the same loss curve over 30 training steps, honour padding masks, and leave
cached decoding (generate) to the original forward.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hcr_kernels.mamba_patch import apply_hcr_kernels_to_mamba, remove_hcr_kernels_from_mamba  # noqa: E402


def tiny_mamba(seed=0, layers=2):
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=layers, state_size=16, expand=2, conv_kernel=4,
        time_step_rank=4,
    )
    return transformers.MambaForCausalLM(config)


@pytest.mark.usefixtures("cpu_isa")
def test_same_logits_and_gradients():
    model = tiny_mamba()
    patched = apply_hcr_kernels_to_mamba(copy.deepcopy(model))
    ids = torch.randint(0, 32, (3, 21))
    outputs = []
    for m in (model, patched):
        out = m(ids, labels=ids)
        out.loss.backward()
        outputs.append((out.logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (logits, grads), (patched_logits, patched_grads) = outputs
    torch.testing.assert_close(patched_logits, logits, atol=1e-5, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(patched_grads[name], grad, atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_patch_changes_no_weights_and_is_idempotent():
    model = tiny_mamba()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    apply_hcr_kernels_to_mamba(apply_hcr_kernels_to_mamba(model))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    mixers = [m for m in model.modules() if type(m).__name__ == "MambaMixer"]
    assert mixers and all("forward" in vars(m) for m in mixers)
    remove_hcr_kernels_from_mamba(model)
    assert all("forward" not in vars(m) for m in mixers)


def test_training_follows_the_same_loss_curve():
    curves = []
    for patch in (False, True):
        model = tiny_mamba(seed=1)
        if patch:
            apply_hcr_kernels_to_mamba(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        data = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(30):
            ids = torch.randint(0, 32, (8, 24), generator=data)
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    plain, patched = curves
    assert plain[-1] < plain[0] - 0.2, "the tiny model should learn something in 30 steps"
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(plain), atol=2e-3, rtol=1e-3)


def test_padding_mask_is_honoured():
    model = tiny_mamba()
    patched = apply_hcr_kernels_to_mamba(copy.deepcopy(model))
    ids = torch.randint(0, 32, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    expected = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(patched(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-4)


def test_generation_with_cache_matches():
    model = tiny_mamba().eval()
    patched = apply_hcr_kernels_to_mamba(copy.deepcopy(model))
    prompt = torch.randint(0, 32, (2, 7))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_model_without_mixers_is_rejected():
    with pytest.raises(ValueError, match="has no MambaMixer modules"):
        apply_hcr_kernels_to_mamba(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        apply_hcr_kernels_to_mamba("model")
    with pytest.raises(ValueError, match=r"backend must be None or one of \('reference', "):  # not at the first forward
        apply_hcr_kernels_to_mamba(torch.nn.Linear(2, 2), backend="bogus")
