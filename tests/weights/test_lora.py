"""Localized LoRA on a tiny random Llama: only the chosen layers train, and the merged patch equals
peft's own merge (``merge_and_unload``), the independent reference."""

from __future__ import annotations

import copy

import pytest
import torch

from patchtrace.results import Scores
from patchtrace.weights import WeightPatchError, apply_state
from patchtrace.weights.lora import attach, layers_from_scores, merged_patch, random_layers, train_lora


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def lm_loss(m, ids):
    return m(input_ids=ids, labels=ids).loss


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def test_only_the_chosen_layers_get_gradients_and_the_merge_matches_peft():
    hf = tiny_llama()
    base = {k: v.clone() for k, v in hf.state_dict().items()}
    pm = attach(hf, [1, 3], targets="mlp", r=4, alpha=8)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(pm, IDS).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    lm_loss(pm, IDS).backward()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {int(n.split("layers.")[1].split(".")[0]) for n in with_grad} == {1, 3}
    assert {n.split(".mlp.")[1].split(".")[0] for n in with_grad} == {"gate_proj", "up_proj", "down_proj"}
    patch = merged_patch(pm)
    assert sorted(patch.names) == sorted(f"model.layers.{i}.mlp.{m}.weight" for i in (1, 3)
                                         for m in ("gate_proj", "up_proj", "down_proj"))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    mine, _ = apply_state(patch, base)  # the patch's base hash is the untouched model's: no override
    assert mine.keys() == {k for k in merged if k != "lm_head.weight"} | {k for k in mine}
    for n in mine:
        torch.testing.assert_close(mine[n], merged[n], rtol=0, atol=2e-6)
    assert any(not torch.equal(mine[n], base[n]) for n in patch.names)


def test_train_lora_leaves_the_model_as_it_was():
    hf = tiny_llama()
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    run = train_lora(hf, [2], [IDS], lm_loss, steps=3, lr=0.05, targets="attn", r=2)
    assert type(hf).__name__ == "LlamaForCausalLM"
    after = hf.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in hf.parameters())
    assert all(n.startswith("model.layers.2.self_attn.") for n in run.patch.names) and len(run.losses) == 3
    assert run.trainable == 2 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))  # r·(in+out) for q, k, v (GQA: 16 out), o
    assert sorted(run.targets) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert run.losses[-1] < run.losses[0]
    run.patch.apply(hf)
    assert not torch.equal(hf.state_dict()["model.layers.2.self_attn.q_proj.weight"], before["model.layers.2.self_attn.q_proj.weight"])


def test_layers_from_scores_and_controls():
    v = torch.zeros(5, 3)
    v[3, 1], v[1, 2], v[0, 0] = 0.9, 0.5, -2.0
    s = Scores(v, ("layer", "pos"), "mlp_out", value_name="effect", metric="prob")
    assert layers_from_scores(s, 2) == [1, 3]
    assert layers_from_scores(s, 1, by="abs") == [0]
    sub = Scores(v[2:], ("layer", "pos"), "mlp_out", labels={"layer_index": ["2", "3", "4"]})
    assert layers_from_scores(sub, 1) == [3]
    assert random_layers(30, 3, seed=1, exclude=[1, 2]) == random_layers(30, 3, seed=1, exclude=[1, 2])
    assert not set(random_layers(30, 3, seed=1, exclude=[1, 2])) & {1, 2}
    with pytest.raises(WeightPatchError, match="no 'layer' axis"):
        layers_from_scores(Scores(v, ("head", "pos"), "head"), 1)
    with pytest.raises(WeightPatchError, match="k=9"):
        layers_from_scores(s, 9)
    with pytest.raises(WeightPatchError, match=r"within 0\.\.3"):
        attach(tiny_llama(), [7])
    with pytest.raises(WeightPatchError, match="no module named like"):
        attach(tiny_llama(), [1], targets="conv_in")


class Tower(torch.nn.Module):
    """No numbered blocks (like a diffusers UNet): LoRA is attached by module name."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "ff": torch.nn.Linear(8, 8)})
        self.up = torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "ff": torch.nn.Linear(8, 4)})

    def forward(self, x):
        x = torch.relu(self.down["ff"](self.down["attn"](x)))
        return self.up["ff"](self.up["attn"](x))


def test_any_module_by_module_names():
    torch.manual_seed(0)
    net = Tower()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def loss(m, b):
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    pm = attach(net, ["down.attn", "up.ff"], r=2, alpha=4)
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss(pm, (x, y)).backward()
        opt.step()
    with_grad = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n and (".down.attn." in n or ".up.ff." in n) for n in with_grad)
    patch = merged_patch(pm)
    assert sorted(patch.names) == ["down.attn.weight", "up.ff.weight"]
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    mine, _ = apply_state(patch, base)
    for n in merged:
        torch.testing.assert_close(mine[n], merged[n], rtol=0, atol=2e-6)
    with pytest.raises(WeightPatchError, match=r"no module 'mid\.attn'"):
        attach(Tower(), ["mid.attn"])
