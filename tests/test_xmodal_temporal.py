"""The target tower's divided space-time attention (`featspec.xmodal.models.temporal`)."""

import pytest
import torch

from featspec.xmodal.models.temporal import TemporalMixer, add_temporal_attention


def _tower(layers: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=32, patch_size=16)
    return CLIPVisionModel(cfg).eval()


def test_mixer_starts_as_identity_then_mixes_frames_in_order():
    torch.manual_seed(0)
    mixer = TemporalMixer(16, 2, frames=4)
    x = torch.randn(2 * 4, 5, 16)  # 2 clips x 4 frames, 5 tokens each
    assert torch.equal(mixer(x), x)
    torch.nn.init.normal_(mixer.attn.out_proj.weight)
    y = mixer(x)
    # a token sees the same position in the other frames of its clip, and no other clip
    x2 = x.clone()
    x2[3, 2] += torch.randn(16)  # clip 0, frame 4, token 2
    d = (mixer(x2) - y).abs().sum(-1)
    assert d[0:4, 2].gt(1e-6).all() and d[0:4, [0, 1, 3, 4]].max() < 1e-6 and d[4:].max() < 1e-6
    # the frame embedding makes it order-aware: reversing the frames does not just reverse the output
    rev = x.unflatten(0, (2, 4)).flip(1).flatten(0, 1)
    assert not torch.allclose(mixer(rev).unflatten(0, (2, 4)).flip(1).flatten(0, 1), y, atol=1e-4)


def test_mixer_rejects_a_batch_that_is_not_whole_clips():
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        TemporalMixer(16, 2, frames=4)(torch.randn(6, 5, 16))


def test_tower_with_temporal_attention_keeps_its_spatial_weights_and_output_at_init():
    plain, timed = _tower(), _tower()
    add_temporal_attention(timed, frames=4)
    names = set(timed.state_dict())
    assert set(plain.state_dict()) < names
    assert all(".temporal." in n for n in names - set(plain.state_dict()))
    px = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        a = plain(px, output_hidden_states=True).hidden_states[-1]
        b = timed(px, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(a, b, atol=1e-6)
        for layer in timed.encoder.layers:
            torch.nn.init.normal_(layer.temporal.attn.out_proj.weight, std=0.2)
        c = timed(px, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(a, c, atol=1e-3)  # the hooks run inside the real CLIP forward
