"""Losses and pooling against transformers, gradients, gradient checkpointing, dropout."""

import pytest
import torch
from helpers import hf_twin, perturb, random_ids, tiny_config, tiny_lm

from glm4 import Glm4ForSequenceClassification, Glm4ForTokenClassification


def test_causal_lm_loss_matches_transformers():
    model = tiny_lm()
    hf = hf_twin(model)
    ids = random_ids(2, 10)
    labels = ids.clone()
    labels[0, :3] = -100  # e.g. a prompt that is not trained on
    with torch.no_grad():
        ours = model(ids, labels=labels).loss
        ref = hf(ids, labels=labels).loss
    assert ours.shape == () and abs(ours.item() - ref.item()) <= 1e-5
    # Hand check of the shift: position t predicts token t + 1.
    logits = model(ids).logits.detach()
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    assert abs(ours.item() - manual.item()) <= 1e-5


def seq_classifier(num_labels: int, problem_type: str | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(num_labels=num_labels, problem_type=problem_type)
    return perturb(Glm4ForSequenceClassification(config), seed).eval()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "num_labels,problem,labels",
    [
        (1, None, torch.tensor([0.5, -1.0])),
        (3, None, torch.tensor([2, 0])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
        (2, "regression", torch.tensor([[0.1, 0.2], [0.3, -0.4]])),
    ],
)
def test_sequence_classification_matches_transformers(side, num_labels, problem, labels):
    model = seq_classifier(num_labels, problem)
    hf = hf_twin(model, "Glm4ForSequenceClassification")
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    if side == "left":
        ids[0, :3], mask[0, :3] = 0, 0  # pad id 0
    else:
        ids[0, -3:], mask[0, -3:] = 0, 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels)
        ref = hf(ids, attention_mask=mask, labels=labels)
        assert ours.logits.shape == (2, num_labels)
        assert (ours.logits - ref.logits).abs().max() <= 1e-5
        assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5
        # Pooled at the rightmost real token: the same as running the unpadded sequence alone.
        alone = model(ids[:1, mask[0].bool()]).logits if side == "right" else None
        if alone is not None:
            assert (ours.logits[0] - alone[0]).abs().max() <= 1e-5


def test_token_classification_matches_transformers():
    torch.manual_seed(0)
    model = perturb(Glm4ForTokenClassification(tiny_config(num_labels=5))).eval()
    hf = hf_twin(model, "Glm4ForTokenClassification")
    ids = random_ids(2, 7)
    labels = torch.randint(0, 5, (2, 7))
    labels[1, -2:] = -100
    with torch.no_grad():
        ours, ref = model(ids, labels=labels), hf(ids, labels=labels)
    assert ours.logits.shape == (2, 7, 5)
    assert (ours.logits - ref.logits).abs().max() <= 1e-5
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5


def test_gradients_flow_to_every_parameter():
    for model in (
        tiny_lm().train(),
        seq_classifier(3).train(),
        Glm4ForTokenClassification(tiny_config(num_labels=3)).train(),
    ):
        ids = random_ids(2, 8)
        labels = (
            ids
            if hasattr(model, "lm_head")
            else torch.randint(0, 3, (2, 8) if hasattr(model, "dropout") else (2,))
        )
        model(ids, labels=labels).loss.backward()
        for name, p in model.named_parameters():
            if name == "model.embed_tokens.weight":
                continue  # only the rows of the tokens used get gradient
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool):
        model = tiny_lm().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = random_ids(2, 8)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, plain = grads(False)
    loss_b, checkpointed = grads(True)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


def test_no_cache_is_built_while_training():
    model = tiny_lm().train()
    assert model(random_ids(1, 4)).past_key_values is None


def test_dropout_where_the_config_asks():
    model = tiny_lm(attention_dropout=0.5)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # eval: deterministic
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)
    head = Glm4ForTokenClassification(tiny_config(classifier_dropout=0.3))
    assert head.dropout.p == 0.3
    assert Glm4ForTokenClassification(tiny_config()).dropout.p == 0.1
