"""Backbone: offline weight loading (official DINOv3 and timm formats), seeded random init, multi-layer tokens."""

import json
import pickle

import pytest
import safetensors.torch
import torch

from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import DataError
from biomass_cache.backbone.vit import backbone_fingerprint, create_backbone, forward_tokens, resolve_layers
from biomass_cache.common.errors import WeightsError

TINY = dict(depth=4, embed_dim=64, num_heads=2)
PLAIN = "vit_small_patch16_dinov3"  # no q/v biases, GELU MLP
GATED = "vit_small_plus_patch16_dinov3_qkvb"  # q/v biases, SwiGLU MLP


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt by timm to fetch pretrained weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("timm tried to load pretrained weights")
    monkeypatch.setattr("timm.models._builder.load_pretrained", refuse)


def images(b=2, h=32, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def source_model(name, seed=1):
    """A tiny timm model with every parameter random (so a wrong mapping cannot go unnoticed)."""
    model = create_backbone(name, seed=seed, overrides=TINY).model
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def to_official(model):
    """Invert timm's eva.checkpoint_filter_fn: timm state dict -> Meta's release key names."""
    state, out = model.state_dict(), {}
    for key, value in state.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if any("fc1_g" in k for k in state):  # SwiGLU: w1 gate, w2 value, w3 output
            key = key.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3")
        out[key] = value.clone()
    dim = model.embed_dim
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q = attn.q_bias if attn.q_bias is not None else torch.zeros(dim)
        v = attn.v_bias if attn.v_bias is not None else torch.zeros(dim)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.full((dim,), 3.0), v]).detach().clone()
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    out["mask_token"] = torch.zeros(1, dim)
    out["rope_embed.periods"] = torch.arange(dim // 4, dtype=torch.float32)
    return out


def reference_tokens(model, x, layers, norm):
    out = model.forward_intermediates(x, indices=layers, norm=norm, output_fmt="NLC",
                                      return_prefix_tokens=True, intermediates_only=True)
    return torch.stack([t for t, _ in out], 1), torch.stack([p for _, p in out], 1)


@pytest.mark.parametrize("name", [PLAIN, GATED])
def test_official_checkpoint_round_trip(tmp_path, name):
    src = source_model(name)
    official = to_official(src)
    assert "storage_tokens" in official and "blocks.0.ls1.gamma" in official
    path = tmp_path / "dinov3_vits16_pretrain_test.pth"
    torch.save(official, path)
    backbone = create_backbone(name, weights=path, overrides=TINY)
    assert backbone.weights == str(path) and len(backbone.weights_sha256) == 64
    for key, value in src.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value), key
    x = images()
    tokens, prefix = forward_tokens(backbone, x, [1, 3], norm=True)
    ref_tokens, ref_prefix = reference_tokens(src, x, [1, 3], norm=True)
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    torch.testing.assert_close(prefix, ref_prefix, rtol=0, atol=0)


def test_timm_safetensors_round_trip(tmp_path):
    src = source_model(GATED, seed=3)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    backbone = create_backbone(GATED, weights=path, overrides=TINY)
    x = images(seed=4)
    torch.testing.assert_close(forward_tokens(backbone, x, [0, 2], norm=False),
                               reference_tokens(src, x, [0, 2], norm=False), rtol=0, atol=0)
    assert backbone.weights_sha256 == sha256_file(path) != "random"


def test_nonzero_qv_bias_into_model_without_bias_refused(tmp_path):
    official = to_official(source_model(GATED))  # has real q/v biases
    path = tmp_path / "official.pth"
    torch.save(official, path)
    with pytest.raises(WeightsError, match="_qkvb"):
        create_backbone("vit_small_plus_patch16_dinov3", weights=path, overrides=TINY)


def test_missing_and_unexpected_keys_listed(tmp_path):
    state = source_model(PLAIN).state_dict()
    del state["blocks.2.norm1.weight"]
    state["blocks.9.surprise"] = torch.zeros(3)
    path = tmp_path / "broken.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError) as err:
        create_backbone(PLAIN, weights=path, overrides=TINY)
    message = str(err.value)
    assert str(path) in message and "blocks.2.norm1.weight" in message and "blocks.9.surprise" in message


def test_wrong_shapes_name_the_file(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(source_model(PLAIN).state_dict(), path)
    with pytest.raises(WeightsError, match="wide.pth"):
        create_backbone(PLAIN, weights=path, overrides=dict(TINY, embed_dim=32))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nowhere.pth"):
        create_backbone(PLAIN, weights=tmp_path / "nowhere.pth", overrides=TINY)


def test_unreadable_and_unsafe_files_refused(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="garbage.pth"):
        create_backbone(PLAIN, weights=garbage, overrides=TINY)
    unsafe = tmp_path / "unsafe.pth"  # an arbitrary pickled object: weights_only=True must refuse it
    torch.save({"model": pickle.PickleError("x")}, unsafe)
    with pytest.raises(WeightsError, match="unsafe.pth.*Weights only load failed"):
        create_backbone(PLAIN, weights=unsafe, overrides=TINY)


def test_random_init_deterministic_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = create_backbone(PLAIN, seed=7, overrides=TINY).model.state_dict()
    after = torch.rand(3)
    assert torch.equal(before, after)  # the global RNG stream is not consumed
    b = create_backbone(PLAIN, seed=7, overrides=TINY).model.state_dict()
    c = create_backbone(PLAIN, seed=8, overrides=TINY).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])


def test_backbone_is_frozen_and_described():
    backbone = create_backbone(PLAIN, overrides=TINY)
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert (backbone.embed_dim, backbone.depth, backbone.patch_size, backbone.n_prefix) == (64, 4, 16, 5)
    fp = backbone_fingerprint(backbone)
    assert json.loads(json.dumps(fp)) == fp
    assert fp["weights_sha256"] == "random" and fp["random_seed"] == 0 and fp["overrides"] == TINY


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vit_small_patch16_dinov2", overrides=TINY)
    with pytest.raises(ValueError, match="pretrained"):
        create_backbone(PLAIN, overrides=dict(TINY, pretrained=True))
    with pytest.raises(DataError, match=r"overrides .*'bogus': 1.* are not settings vit_small_patch16_dinov3 takes"):
        create_backbone(PLAIN, overrides=dict(TINY, bogus=1))


def test_resolve_layers():
    assert resolve_layers([-1, 0, 5], 12) == [0, 5, 11]
    assert resolve_layers([-12], 12) == [0]
    for bad in ([12], [-13], [], [1, -11], [1.0]):
        with pytest.raises(ValueError):
            resolve_layers(bad, 12)


def test_forward_tokens_shapes_order_and_norm():
    backbone = create_backbone(PLAIN, overrides=TINY)
    with torch.no_grad():  # make the blocks do something (layer-scale init is 1e-5)
        for block in backbone.model.blocks:
            block.gamma_1.fill_(0.5)
            block.gamma_2.fill_(0.5)
    x = images(b=2, h=32, w=64)
    tokens, prefix = forward_tokens(backbone, x, [-1, 0], norm=False)
    assert tokens.shape == (2, 2, 2 * 4, 64) and prefix.shape == (2, 2, 5, 64)
    last, _ = forward_tokens(backbone, x, [3], norm=False)
    first, _ = forward_tokens(backbone, x, [0], norm=False)
    assert torch.equal(tokens[:, 0], last[:, 0]) and torch.equal(tokens[:, 1], first[:, 0])
    assert not torch.allclose(tokens[:, 0], tokens[:, 1])
    normed, normed_prefix = forward_tokens(backbone, x, [-1, 0], norm=True)
    assert not torch.allclose(normed, tokens)
    torch.testing.assert_close(normed, backbone.model.norm(tokens))
    torch.testing.assert_close(normed_prefix, backbone.model.norm(prefix))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        forward_tokens(backbone, images(h=40), [0], norm=True)
    with pytest.raises(ValueError, match="out of range"):
        forward_tokens(backbone, x, [4], norm=True)
