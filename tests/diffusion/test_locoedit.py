"""LocoEdit: the closed form equals a least-squares solve written separately; the patch is exact and scoped."""

from __future__ import annotations

import pytest
import torch

from patchtrace.diffusion.adapters import DiffusionError, T2IAdapter
from patchtrace.diffusion.locoedit import last_token_states, locoedit, solve

CONCEPT = ["a red two on a white background in a box", "two in red on white inside a frame", "a blue x in a box"]
ANCHOR = ["a red two on a white background", "two in red on white", "a blue x"]


def test_solve_matches_stacked_lstsq():
    g = torch.Generator().manual_seed(0)
    W, X, Y = torch.randn(6, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    lam = 0.3
    # argmin ||X W^T - Y W_old^T||^2 + lam ||W - W_old||^2 as one ordinary least-squares problem
    A = torch.cat([X, lam**0.5 * torch.eye(5)]).double()
    B = torch.cat([Y @ W.T, lam**0.5 * W.T]).double()
    ref = torch.linalg.lstsq(A, B).solution.T.float()
    assert torch.allclose(solve(W, X, Y, lam), ref, atol=1e-5)


def test_patch_edits_only_chosen_layers_and_is_exact(sd):
    a = T2IAdapter(sd, steps=1)
    unet = sd.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    patch = locoedit(a, [1, 4], CONCEPT, ANCHOR)
    names = {f"{a.layers[j].name}.{p}.weight" for j in (1, 4) for p in ("to_k", "to_v")}
    assert set(patch.names) == names
    x, y = last_token_states(a, CONCEPT), last_token_states(a, ANCHOR)
    k_old = a.layers[1].to_k
    target = y @ k_old.weight.T
    with patch.applied(unet):
        edited = x @ a.layers[1].to_k.weight.T
        far = (x @ before[f"{a.layers[1].name}.to_k.weight"].T - target).norm()
        assert (edited - target).norm() < 0.05 * far  # concept keys now close to the anchor's
        assert torch.equal(unet.state_dict()[f"{a.layers[0].name}.to_k.weight"], before[f"{a.layers[0].name}.to_k.weight"])
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_last_token_is_before_eos(sd):
    a = T2IAdapter(sd, steps=1)
    tok = sd.tokenizer
    ids = tok(CONCEPT[0]).input_ids
    assert tok.convert_ids_to_tokens(ids[len(ids) - 2]) == "box"
    full = a.encode(CONCEPT[:1]).pos[0]
    assert torch.equal(last_token_states(a, CONCEPT[:1])[0], full[len(ids) - 2])


def test_refusals(sd):
    a = T2IAdapter(sd, steps=1)
    with pytest.raises(DiffusionError, match="layer 6 does not exist"):
        locoedit(a, [6], CONCEPT, ANCHOR)
    with pytest.raises(DiffusionError, match="2 anchors for 3 concept"):
        locoedit(a, [0], CONCEPT, ANCHOR[:2])
