"""Partial-layer fine-tuning: only the selection trains, and the exported patch is the whole update."""

from __future__ import annotations

import pytest
import torch

from patchtrace.errors import PatchtraceWarning
from patchtrace.weights import WeightPatchError
from patchtrace.weights.finetune import finetune, freeze_except


def net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1)] + ([torch.nn.BatchNorm2d(4)] if bn else [torch.nn.Identity()])
    return torch.nn.Sequential(*layers, torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 64, 10))


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[:16], y[:16]), (x[16:], y[16:])]


def ce(m, b):
    return torch.nn.functional.cross_entropy(m(b[0]), b[1])


def test_only_selected_layers_train_and_the_patch_reproduces_the_model():
    m = net()
    start = {k: v.clone() for k, v in m.state_dict().items()}
    grads = {}

    def spy(mod, batch):  # record which parameters receive gradients on the first step
        loss = ce(mod, batch)
        if not grads:
            loss.backward(retain_graph=True)
            grads.update({n: p.grad for n, p in mod.named_parameters()})
            mod.zero_grad(set_to_none=True)
        return loss

    up = finetune(m, "3.*", data(), spy, steps=5, lr=0.05)
    assert grads["3.weight"] is not None and grads["0.weight"] is None and grads["6.weight"] is None
    after = m.state_dict()
    for k in start:
        if k.startswith("3."):
            assert not torch.equal(after[k], start[k]), k
        else:
            assert torch.equal(after[k], start[k]), k
    assert up.patch.names == ["3.weight", "3.bias"] and len(up.losses) == 5
    assert up.trainable == 4 * 4 * 9 + 4 and up.total == sum(p.numel() for p in m.parameters())
    fresh = net()
    up.patch.apply(fresh)  # the starting weights are the patch's base: no override needed
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=1e-6)
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    s = up.sizes()
    assert s["patch_bytes"] == 4 * up.trainable and s["full_delta_bytes"] == 4 * up.total
    assert s["model_over_patch"] == pytest.approx(up.total / up.trainable)


def test_layer_indices_select_transformer_blocks():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=50)
    hf = LlamaForCausalLM(cfg)
    names = freeze_except(hf, [2])
    assert names and all(n.startswith("model.layers.2.") for n in names)
    assert {n for n, p in hf.named_parameters() if p.requires_grad} == set(names)


def test_running_statistics_outside_the_selection_are_reported():
    with pytest.warns(PatchtraceWarning, match=r"'1\.running_mean'|'1\.running_var'"):
        finetune(net(bn=True), "3.*", data(), ce, steps=1)


def test_bad_input():
    with pytest.raises(WeightPatchError, match="matches no"):
        finetune(net(), "nothing.*", data(), ce, steps=1)
    with pytest.raises(WeightPatchError, match="steps 0"):
        finetune(net(), "3.*", data(), ce, steps=0)
    with pytest.raises(WeightPatchError, match="'lbfgs'"):
        finetune(net(), "3.*", data(), ce, steps=1, optimizer="lbfgs")
