"""FetalCLIPSEG network: shapes, LoRA wiring (and the out_proj trap), gradients, FetalCLIP weights, checkpoints."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from algorithm import __version__
from algorithm.config import ModelConfig
from algorithm.model import (FETALCLIP_CONFIG, CheckpointError, FetalCLIPEncoder, WeightsError, build_model,
                             load_checkpoint, read_checkpoint_info, save_checkpoint, trainable_parameters)
from algorithm.model.encoder import build_visual, clip_config, inject_lora

SMALL = ModelConfig.small()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(seed))


def randomise_lora(module: torch.nn.Module, seed: int = 1, pattern: str = "lora_B") -> int:
    """Give matching LoRA weights non-zero values (peft initialises B to zero); returns how many tensors."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if pattern in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                count += 1
    return count


def lora_grads(model: torch.nn.Module, must_contain: str, kind: str) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if must_contain in n and f"lora_{kind}" in n}


def save_published(clip: torch.nn.Module, path: Path, wrapped: bool = True) -> None:
    """The published FetalCLIP layout: torch.save({'state_dict': {'module.' + k: v}}) of the whole CLIP."""
    sd = clip.state_dict()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}} if wrapped else sd, path)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(SMALL).eval()


# ---------------------------------------------------------------------------------------------- structure

def test_full_config_reproduces_published_fetalclip_config():
    assert clip_config(ModelConfig()) == FETALCLIP_CONFIG
    small = clip_config(SMALL)
    assert small["vision_cfg"]["width"] == 128 and small["vision_cfg"]["head_width"] == 32
    assert small["text_cfg"]["layers"] == 2


def test_forward_shapes_and_one_encoder_pass_for_both_heads(small_model):
    calls = []
    handle = small_model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            out = small_model(images(2))
    finally:
        handle.remove()
    assert out.mask_logits.shape == (2, SMALL.mask_classes, 224, 224)
    assert out.frame_logits.shape == (2, SMALL.frame_classes)
    assert torch.isfinite(out.mask_logits).all() and torch.isfinite(out.frame_logits).all()
    assert len(calls) == 1


def test_rejects_wrong_input_size(small_model):
    with pytest.raises(ValueError, match="224"):
        small_model(torch.zeros(1, 3, 256, 256))


def test_encoder_returns_requested_blocks_and_clip_image_embedding():
    cfg = dataclasses.replace(SMALL, use_lora=False, skip_layers=(1, 3, 4))
    enc = FetalCLIPEncoder(cfg).eval()
    blocks = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: blocks.__setitem__(k, o))
             for k, blk in enumerate(enc.visual.transformer.resblocks, start=1)]
    x = images(2)
    with torch.no_grad():
        feats, emb = enc(x)
        reference = enc.visual(x)  # open_clip's own image embedding (ln_post on the class token, then proj)
    for h in hooks:
        h.remove()
    grid = cfg.grid_size
    assert grid == 16 and len(feats) == len(cfg.skip_layers)
    for layer, f in zip(cfg.skip_layers, feats):
        assert f.shape == (2, cfg.width, grid, grid)
        tokens = blocks[layer][:, 1:]  # block output without the class token, row-major patches
        torch.testing.assert_close(f, tokens.reshape(2, grid, grid, cfg.width).permute(0, 3, 1, 2))
    assert emb.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(emb, reference)


def test_frame_output_does_not_depend_on_batch_mates():
    """InstanceNorm decoder, no BatchNorm anywhere: a frame's output is the same alone or in a batch, in training mode."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL, lora_dropout=0.0)).train()
    x = images(3)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(batched.mask_logits[1:2], alone.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched.frame_logits[1:2], alone.frame_logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- LoRA

def test_lora_on_attention_changes_output_through_in_proj_and_out_proj():
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, lora_targets=("attn",))
    enc = FetalCLIPEncoder(cfg).eval()
    x = images(1)
    with torch.no_grad():
        base = enc(x).embedding
        assert randomise_lora(enc, pattern="attn.lora_B") == cfg.layers  # q, k, v adapter only
        with_in_proj = enc(x).embedding
        for name, p in enc.named_parameters():
            if "attn.lora_B" in name:
                p.zero_()
        assert randomise_lora(enc, pattern="out_proj.lora_B") == cfg.layers  # output projection adapter only
        with_out_proj = enc(x).embedding
    assert not torch.allclose(base, with_in_proj)
    assert not torch.allclose(base, with_out_proj)


def test_lora_on_out_proj_alone_is_silently_ignored():
    """The trap: MultiheadAttention passes out_proj.weight to its fused kernel, never calling the adapter."""
    torch.manual_seed(0)
    visual = build_visual(SMALL).eval()
    x = images(1)
    with torch.no_grad():
        before = visual(x)
        inject_lora(visual, SMALL, targets=("out_proj",))
        assert randomise_lora(visual) == SMALL.layers  # the adapters exist and are non-zero...
        after = visual(x)
    assert torch.equal(before, after)  # ...and change nothing
    # in training the output does not even depend on them: the adapters are the only trainable tensors
    visual.train()
    assert all(p.requires_grad == ("lora_" in n) for n, p in visual.named_parameters())
    assert not visual(x).requires_grad


def test_one_training_step_trains_attention_lora():
    torch.manual_seed(0)
    model = build_model(SMALL).train()
    assert model.encoder.has_lora and not SMALL.encoder_no_grad
    x, mask, frame = images(1), torch.randint(0, 2, (1, 224, 224)), torch.tensor([2])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)

    def step() -> None:
        opt.zero_grad()
        out = model(x)
        (F.cross_entropy(out.mask_logits, mask) + F.cross_entropy(out.frame_logits, frame)).backward()

    step()
    b_grads = lora_grads(model, ".attn.", "B")
    assert len(b_grads) == 2 * SMALL.layers  # in_proj and out_proj adapters of every block
    assert all(g is not None and g.abs().sum() > 0 for g in b_grads.values()), b_grads.keys()
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, ".mlp.", "B").values())
    # the pretrained weights stay frozen
    attn = model.encoder.visual.transformer.resblocks[0].attn
    assert attn.base_layer.in_proj_weight.grad is None and attn.base_layer.out_proj.base_layer.weight.grad is None
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and ".attn." in n}
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    step()  # with B non-zero, A receives gradient too
    assert all(g is not None and g.abs().sum() > 0 for g in lora_grads(model, ".attn.", "A").values())


def test_encoder_no_grad_blocks_lora_gradients_like_the_paper_code():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL, encoder_no_grad=True)).train()
    out = model(images(1))
    (out.mask_logits.mean() + out.frame_logits.mean()).backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.grad is None for p in lora)
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(p.grad is not None for p in model.frame_head.parameters())


def test_grad_checkpointing_gives_the_same_lora_gradients():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL, lora_dropout=0.0)).train()
    randomise_lora(model)
    x = images(1)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        feats, emb = model.encoder(x)  # checkpointing only changes the encoder
        (sum(f.square().mean() for f in feats) + emb.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


def test_freeze_base_and_trainable_parameters():
    with_lora = build_model(SMALL)
    trainable = {n for n, p in with_lora.named_parameters() if p.requires_grad}
    expected = ({n for n, _ in with_lora.named_parameters() if "lora_" in n}
                | {f"decoder.{n}" for n, _ in with_lora.decoder.named_parameters()}
                | {f"frame_head.{n}" for n, _ in with_lora.frame_head.named_parameters()})
    assert trainable == expected
    assert trainable_parameters(with_lora) == sum(p.numel() for n, p in with_lora.named_parameters() if n in expected)

    scratch = build_model(dataclasses.replace(SMALL, use_lora=False))
    assert not any("lora_" in n for n, _ in scratch.named_parameters())
    assert all(p.requires_grad for p in scratch.parameters())
    scratch.encoder.freeze_base()
    assert trainable_parameters(scratch.encoder) == 0


def test_merge_lora_keeps_outputs_and_gives_plain_architecture():
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    randomise_lora(model)
    x = images(1)
    with torch.no_grad():
        before = model(x)
        model.merge_lora()
        after = model(x)
    torch.testing.assert_close(after.mask_logits, before.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.frame_logits, before.frame_logits, atol=1e-4, rtol=1e-4)
    assert model.config.use_lora is False
    plain = build_model(dataclasses.replace(SMALL, use_lora=False))
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_inference_mode_call_leaves_parameters_updatable(small_model):
    """peft re-registers attention weights per call; under inference_mode they must not become inference tensors."""
    model = build_model(SMALL).eval()
    randomise_lora(model)
    with torch.inference_mode():
        model(images(1))
    assert not any(p.is_inference() for p in model.parameters())
    model.load_state_dict(small_model.state_dict())  # in-place copies into every parameter


# ---------------------------------------------------------------------------------------------- FetalCLIP weights

@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict+module", "plain"])
def test_published_checkpoint_loads_strictly_into_visual(tmp_path, wrapped):
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**clip_config(SMALL))
    path = tmp_path / "FetalCLIP_weights.pt"
    save_published(clip, path, wrapped)
    enc = FetalCLIPEncoder(dataclasses.replace(SMALL, use_lora=False), weights=path)
    reference = clip.visual.state_dict()
    loaded = enc.visual.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_pretrained_weights_sit_under_lora_and_untrained_lora_is_identity(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**clip_config(SMALL))
    path = tmp_path / "FetalCLIP_weights.pt"
    save_published(clip, path)
    with_lora = FetalCLIPEncoder(SMALL, weights=path).eval()
    blk = with_lora.visual.transformer.resblocks[0]
    ref = clip.visual.transformer.resblocks[0]
    assert torch.equal(blk.attn.base_layer.in_proj_weight, ref.attn.in_proj_weight)
    assert torch.equal(blk.mlp.c_fc.base_layer.weight, ref.mlp.c_fc.weight)
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(with_lora(x).embedding, clip.visual.eval()(x))


def test_pretrained_safetensors_file_loads(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**clip_config(SMALL))
    path = tmp_path / "FetalCLIP_weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    enc = FetalCLIPEncoder(dataclasses.replace(SMALL, use_lora=False), weights=path)
    assert torch.equal(enc.visual.proj, clip.visual.proj)


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing: transformer.resblocks.0.ln_1.weight"),
    ("extra", "unexpected: extra_tensor"),
    ("text_only", "no 'visual"),
    ("wider", "shape mismatch"),
    ("garbage", "cannot read"),
    ("absent", "not found"),
])
def test_bad_pretrained_weights_raise_naming_the_file(tmp_path, damage, message):
    path = tmp_path / f"weights_{damage}.pt"
    cfg = dataclasses.replace(SMALL, width=64, heads=2) if damage == "wider" else SMALL
    sd = open_clip.model.CLIP(**clip_config(cfg)).state_dict()
    if damage == "drop":
        del sd["visual.transformer.resblocks.0.ln_1.weight"]
    elif damage == "extra":
        sd["visual.extra_tensor"] = torch.zeros(1)
    elif damage == "text_only":
        sd = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage != "absent":
        torch.save({"state_dict": sd}, path)
    with pytest.raises(WeightsError, match=message) as info:
        FetalCLIPEncoder(SMALL, weights=path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- our checkpoints

def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    randomise_lora(model)
    path = save_checkpoint(tmp_path / "ckpt" / "model.safetensors", model, SMALL,
                           provenance="replica-trained demo weights, not for clinical use", extra={"epoch": 3})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left behind
    assert path.stat().st_mode & 0o044 == 0o044  # readable by a container's non-root user
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert info.config == SMALL
    assert info.provenance == "replica-trained demo weights, not for clinical use"
    assert info.version == __version__ and info.format_version == 1
    assert info.extra == {"epoch": 3}
    assert info.preprocessing["image_size"] == 224 and len(info.preprocessing["mean"]) == 3
    assert read_checkpoint_info(path) == info
    x = images(2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.mask_logits, b.mask_logits) and torch.equal(a.frame_logits, b.frame_logits)


def test_merged_model_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    randomise_lora(model)
    model.merge_lora()
    with pytest.raises(ValueError, match="does not describe"):
        save_checkpoint(tmp_path / "wrong.safetensors", model, SMALL, provenance="test")
    assert not (tmp_path / "wrong.safetensors").exists()
    path = save_checkpoint(tmp_path / "merged.safetensors", model, model.config, provenance="test")
    loaded, info = load_checkpoint(path)
    assert info.config.use_lora is False
    x = images(1)
    with torch.no_grad():
        assert torch.equal(model(x).mask_logits, loaded(x).mask_logits)


def test_load_checkpoint_can_merge_adapters_for_inference(tmp_path):
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    randomise_lora(model)
    path = save_checkpoint(tmp_path / "model.safetensors", model, SMALL, provenance="test")
    merged, info = load_checkpoint(path, merge_lora=True)
    assert info.config == SMALL and merged.config.use_lora is False
    assert not any("lora_" in n for n in merged.state_dict())
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).frame_logits, model(x).frame_logits, atol=1e-4, rtol=1e-4)


def test_failed_save_keeps_previous_file(tmp_path, small_model, monkeypatch):
    path = save_checkpoint(tmp_path / "model.safetensors", small_model, SMALL, provenance="first")

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("algorithm.model.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, small_model, SMALL, provenance="second")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert read_checkpoint_info(path).provenance == "first"


@pytest.mark.parametrize("damage, message", [
    ("absent", "not found"),
    ("garbage", "not a readable safetensors"),
    ("truncated", "safetensors|cannot read weights"),
    ("pickle", "not a readable safetensors"),
    ("foreign", "not a fetalclipseg checkpoint"),
    ("bad_config", "invalid metadata"),
    ("other_architecture", "do not match its config"),
])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, small_model, damage, message):
    good = save_checkpoint(tmp_path / "good.safetensors", small_model, SMALL, provenance="test")
    path = tmp_path / f"{damage}.safetensors"
    tensors = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    with safe_open(str(good), framework="pt") as fh:
        meta = fh.metadata()
    if damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "pickle":
        torch.save(small_model.state_dict(), path)
    elif damage == "foreign":
        save_file(tensors, str(path), metadata={"format": "pt"})
    elif damage == "bad_config":
        save_file(tensors, str(path), metadata={**meta, "model_config": "{not json"})
    elif damage == "other_architecture":
        other = json.dumps(dataclasses.replace(SMALL, decoder_filters=8).to_dict())
        save_file(tensors, str(path), metadata={**meta, "model_config": other})
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------- full size

@pytest.mark.slow
def test_full_fetalclip_checkpoint_loads_strictly_and_reports_size(tmp_path):
    """Randomly initialised FetalCLIP-shaped CLIP (both towers) in the published format -> our encoder."""
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(**FETALCLIP_CONFIG)
    path = tmp_path / "FetalCLIP_weights.pt"
    save_published(clip, path)
    reference = clip.visual.state_dict()
    del clip
    model = build_model(ModelConfig(), fetalclip_weights=path).eval()
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora == 24 * 8 * ((1024 + 3 * 1024) + (1024 + 1024) + 2 * (1024 + 4096))  # in_proj, out_proj, c_fc, c_proj
    print(f"trainable {trainable_parameters(model):,} (LoRA {lora:,}); total {sum(p.numel() for p in model.parameters()):,}")
    model.encoder.merge_lora()  # untrained adapters are zero, so merged weights are the loaded ones
    loaded = model.encoder.visual.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x)
    assert out.mask_logits.shape == (1, 2, 224, 224) and out.frame_logits.shape == (1, 3)
    print(f"full forward, batch 1: {time.perf_counter() - start:.2f} s")


# ---------------------------------------------------------------------------------------------- decoders, heads

def published_decoder_parameters(width: int, filters: int, outputs: int) -> int:
    """The published FetalCLIPSEG decoder's size, block by block (github.com/donglihe-hub/FetalCLIP-IQA,
    model.py: UNETR with Conv2DBlock / Deconv2DBlock / SingleDWConv2DBlock, BatchNorm, biases)."""
    def conv(i: int, o: int, k: int = 1, groups: int = 1) -> int:
        return o * (i // groups) * k * k + o

    def block(i: int, o: int) -> int:  # depthwise 3x3 + BN + ReLU + pointwise + BN + ReLU
        return conv(i, i, 3, groups=i) + 2 * i + conv(i, o) + 2 * o

    def up_block(i: int, o: int) -> int:  # depthwise 2x2 transposed conv, then a block
        return conv(i, i, 2, groups=i) + block(i, o)

    def upsample(i: int, o: int) -> int:  # depthwise 2x2 transposed conv + pointwise conv
        return conv(i, i, 2, groups=i) + conv(i, o)

    f, w = filters, width
    return (block(3, f) + block(f, f)
            + up_block(w, 8 * f) + up_block(8 * f, 4 * f) + up_block(4 * f, 2 * f)
            + up_block(w, 8 * f) + up_block(8 * f, 4 * f)
            + up_block(w, 8 * f)
            + upsample(w, 8 * f)
            + block(16 * f, 8 * f) + 2 * block(8 * f, 8 * f) + upsample(8 * f, 4 * f)
            + block(8 * f, 4 * f) + block(4 * f, 4 * f) + upsample(4 * f, 2 * f)
            + block(4 * f, 2 * f) + block(2 * f, 2 * f) + upsample(2 * f, f)
            + block(2 * f, f) + block(f, f) + conv(f, outputs))


@pytest.mark.parametrize("width, filters", [(1024, 32), (128, 16)])
def test_separable_decoder_has_the_published_size(width, filters):
    from algorithm.model.decoder import SeparableUNETRDecoder

    for outputs in (1, 2):
        decoder = SeparableUNETRDecoder(width, outputs, filters)
        assert sum(p.numel() for p in decoder.parameters()) == published_decoder_parameters(width, filters, outputs)
    # the published figure for ViT-L/14, init_filters 32: about 1.6 M
    assert 1.55e6 < published_decoder_parameters(1024, 32, 1) < 1.65e6


def test_separable_decoder_resizes_the_token_grid_and_uses_batch_statistics():
    from algorithm.model.decoder import SeparableUNETRDecoder

    torch.manual_seed(0)
    decoder = SeparableUNETRDecoder(SMALL.width, 2, SMALL.decoder_filters)
    sizes = []
    decoder.proj3.register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-2:])))
    feats = [torch.randn(3, SMALL.width, 16, 16) for _ in range(4)]
    out = decoder(images(3), feats)
    assert out.shape == (3, 2, 224, 224) and sizes == [(14, 14)]  # 16 x 16 tokens -> 14 x 14, as published
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in decoder.modules())
    before = decoder.stage1[0][1].running_mean.clone()
    decoder(images(3), feats)
    assert not torch.equal(before, decoder.stage1[0][1].running_mean)  # training mode updates the statistics


@pytest.mark.parametrize("changes", [dict(decoder="separable"),
                                     dict(decoder="none", frame_head="linear", frame_classes=1, use_lora=False)],
                         ids=["separable", "classifier"])
def test_new_architectures_round_trip_through_our_checkpoint(tmp_path, changes):
    torch.manual_seed(0)
    config = dataclasses.replace(SMALL, **changes)
    model = build_model(config).train()
    model(images(2))  # move BatchNorm statistics away from their initial values
    model.eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, config, provenance="test")
    loaded, info = load_checkpoint(path)
    assert info.config == config
    x = images(2)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.frame_logits, b.frame_logits) and a.frame_logits.shape == (2, config.frame_classes)
    if config.decoder == "none":
        assert a.mask_logits is None and b.mask_logits is None and loaded.decoder is None
    else:
        assert torch.equal(a.mask_logits, b.mask_logits)


def test_checkpoints_written_before_the_decoder_options_keep_their_meaning(tmp_path, small_model):
    """A model_config without `decoder` / `frame_head` (every checkpoint so far) is our UNETR and norm-linear head."""
    path = save_checkpoint(tmp_path / "new.safetensors", small_model, SMALL, provenance="test")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    config = json.loads(meta["model_config"])
    del config["decoder"], config["frame_head"]
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in small_model.state_dict().items()}, str(old),
              metadata={**meta, "model_config": json.dumps(config)})
    loaded, info = load_checkpoint(old)
    assert info.config == SMALL and info.config.decoder == "unetr" and info.config.frame_head == "norm-linear"
    x = images(1)
    with torch.no_grad():
        assert torch.equal(loaded(x).mask_logits, small_model(x).mask_logits)


def test_bundled_demo_weights_load_as_our_decoder():
    from algorithm.weights_location import BUNDLED

    model, info = load_checkpoint(BUNDLED / "fetalclipseg_small_replica.safetensors")
    assert info.config.decoder == "unetr" and info.config.frame_head == "norm-linear"
    assert type(model.decoder).__name__ == "UNETRDecoder" and len(model.frame_head) == 2


def test_an_exported_model_can_be_the_starting_encoder():
    """`--fetalclip` also takes one of our exported models: its (merged) encoder under fresh LoRA."""
    from algorithm.weights_location import BUNDLED

    exported = BUNDLED / "fetalclipseg_small_replica.safetensors"
    trained, info = load_checkpoint(exported)
    assert not info.config.use_lora  # exported merged
    fresh = build_model(dataclasses.replace(info.config, use_lora=True), exported).eval()
    block = fresh.encoder.visual.transformer.resblocks[0]
    assert torch.equal(block.mlp.c_fc.base_layer.weight, trained.encoder.visual.transformer.resblocks[0].mlp.c_fc.weight)
    x = images(1)
    with torch.no_grad():  # untrained LoRA is the identity: the same image embedding as the exported model's
        torch.testing.assert_close(fresh.encoder(x).embedding, trained.encoder(x).embedding)
        assert not torch.allclose(fresh(x).mask_logits, trained(x).mask_logits)  # only the encoder was taken


def test_inert_parameters_are_those_without_gradient():
    """effective_parameters' rule (no_grad encoder, LoRA on a plain MultiheadAttention's out_proj) against
    what a backward pass actually reaches."""
    from algorithm.model.fetalclipseg import effective_parameters, inert_parameter_names

    for changes in (dict(), dict(lora_targets=("c_fc", "c_proj", "out_proj")),
                    dict(lora_targets=("c_fc", "c_proj", "out_proj"), encoder_no_grad=True, decoder="separable")):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(SMALL, lora_dropout=0.0, **changes)).train()
        randomise_lora(model)  # B != 0, so A gets gradient too wherever the adapter is used
        out = model(images(2))
        (out.mask_logits.float().mean() + out.frame_logits.mean()).backward()
        reached = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        flagged = {n for n, p in model.named_parameters() if p.requires_grad}
        assert flagged - reached == inert_parameter_names(model), changes
        assert effective_parameters(model) == sum(p.numel() for n, p in model.named_parameters() if n in reached)
