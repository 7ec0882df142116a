import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmasr.projector import IGNORE, Projector, assemble, n_trainable, stack_frames


def test_stack_frames_drops_the_tail_and_concatenates_k_frames():
    frames = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    stacked, lengths = stack_frames(frames, torch.tensor([7, 4]), k=3)
    assert stacked.shape == (2, 2, 9) and lengths.tolist() == [2, 1]
    assert torch.equal(stacked[0, 1], frames[0, 3:6].reshape(-1))  # frames 3, 4, 5 side by side
    with pytest.raises(ValueError, match="k must be >= 1"):
        stack_frames(frames, torch.tensor([7, 4]), k=0)


def test_projector_shapes_and_parameter_count():
    proj = Projector(encoder_dim=16, lm_hidden=24, hidden=32, k=5)
    out, lengths = proj(torch.randn(3, 23, 16), torch.tensor([23, 10, 4]))
    assert out.shape == (3, 4, 24) and lengths.tolist() == [4, 2, 0]
    assert n_trainable(proj) == (16 * 5 * 32 + 32) + (32 * 24 + 24)


def test_assemble_masks_audio_and_prompt_out_of_the_loss():
    embed = torch.nn.Embedding(50, 8)
    audio = torch.randn(2, 3, 8)
    prompt = torch.tensor([10, 11])
    inputs, mask, labels = assemble(audio, torch.tensor([3, 1]), prompt, [[20, 21], [30]], embed, eos_id=2)
    assert inputs.shape == (2, 3 + 2 + 3, 8)
    assert mask.tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert labels[0].tolist() == [IGNORE] * 5 + [20, 21, 2]
    assert labels[1].tolist() == [IGNORE] * 3 + [30, 2] + [IGNORE] * 3
    assert torch.equal(inputs[1, :1], audio[1, :1]) and torch.equal(inputs[1, 1:3], embed(prompt))


def test_only_the_projector_learns_through_a_frozen_lm():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      initializer_range=0.5))  # weights big enough to be steered
    lm.requires_grad_(False)
    proj = Projector(encoder_dim=8, lm_hidden=16, hidden=32, k=2)
    opt = torch.optim.AdamW(proj.parameters(), lr=3e-2)
    frames, lengths = torch.randn(2, 10, 8), torch.tensor([10, 6])
    losses = []
    for _ in range(100):
        audio, a_len = proj(frames, lengths)
        inputs, mask, labels = assemble(audio, a_len, torch.tensor([5, 6]), [[7, 8], [9]], lm.get_input_embeddings(), 2)
        loss = lm(inputs_embeds=inputs, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8  # the audio prefix steers the frozen LM toward the targets
    assert all(p.grad is None for p in lm.parameters())
