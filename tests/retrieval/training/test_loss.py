import copy
import math

import torch

from retrieval.training.config import INIT_LOGIT_SCALE
from retrieval.training.loss import clip_loss


def test_loss_matches_hand_computation_on_3x3():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.6, 0.8]])
    logit_scale = torch.tensor(math.log(2.0))
    # similarities (image rows x text cols), times scale 2
    s = 2 * image @ text.T
    rows = [-math.log(math.exp(s[i, i]) / sum(math.exp(s[i, j]) for j in range(3)))
            for i in range(3)]
    cols = [-math.log(math.exp(s[j, j]) / sum(math.exp(s[i, j]) for i in range(3)))
            for j in range(3)]
    expected = (sum(rows) / 3 + sum(cols) / 3) / 2
    assert abs(clip_loss(image, text, logit_scale).item() - expected) < 1e-6
    # concrete value so a wrong formula cannot match by symmetry
    assert abs(expected - 0.35755) < 1e-4


def test_temperature_starts_at_clip_value_and_is_clamped_at_100():
    assert abs(math.exp(INIT_LOGIT_SCALE) - 1 / 0.07) < 1e-9
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    at_cap = clip_loss(features, features, torch.tensor(math.log(100.0)))
    beyond = clip_loss(features, features, torch.tensor(math.log(1e6)))
    assert torch.isclose(at_cap, beyond)


def test_loss_decreases_when_training_projections(tiny):
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    tokens = tiny.tokenizer([f"caption number {i}" for i in range(6)])
    model = copy.deepcopy(tiny.model)  # keep the shared fixture untrained
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        image_emb = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        text_emb = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
        loss = clip_loss(image_emb, text_emb, model.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
