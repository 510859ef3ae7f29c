"""The fine-tuning heads on Glm4Model: a score for each sequence (at its last token that is not
padding) or for each token, with transformers' losses; the language-model head is in modeling.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm4.cache import KVCache
from glm4.config import Glm4Config
from glm4.modeling import Glm4Model, Glm4PreTrainedModel, HeadOutput

SequenceClassifierOutput = TokenClassifierOutput = HeadOutput


class Glm4ForSequenceClassification(Glm4PreTrainedModel):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        if self.score.weight.device.type != "meta":
            nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_hidden_states,
        )
        logits = self.score(out.last_hidden_state)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("batches of more than one sequence need config.pad_token_id to find their ends")
        if pad is None or input_ids is None:
            last = torch.full((B,), logits.shape[1] - 1, device=logits.device)
        else:
            # The pad id is also an eos id, so take the rightmost non-pad token: this handles left
            # and right padding alike.
            positions = torch.arange(input_ids.shape[1], device=logits.device)
            last = (positions * (input_ids != pad)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]
        loss = sequence_classification_loss(pooled, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss, pooled, out.past_key_values, out.hidden_states)


class Glm4ForTokenClassification(Glm4PreTrainedModel):
    def __init__(self, config: Glm4Config) -> None:
        super().__init__()
        self.config = config
        self.model = Glm4Model(config)
        p = config.classifier_dropout
        self.dropout = nn.Dropout(0.1 if p is None else p)  # transformers' default for this head
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        if self.score.weight.device.type != "meta":
            nn.init.normal_(self.score.weight, std=config.initializer_range)
            nn.init.zeros_(self.score.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> TokenClassifierOutput:
        out = self.model(
            input_ids,
            attention_mask,
            position_ids,
            past_key_values,
            inputs_embeds,
            use_cache,
            output_hidden_states,
        )
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100
            )
        return TokenClassifierOutput(loss, logits, out.past_key_values, out.hidden_states)


# -- losses ----------------------------------------------------------------------------------------


def sequence_classification_loss(
    pooled: torch.Tensor, labels: torch.Tensor, config: Glm4Config
) -> torch.Tensor:
    num_labels = config.num_labels
    problem = config.problem_type
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    labels = labels.to(pooled.device)
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
        return F.mse_loss(pooled, labels.to(pooled.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(pooled.view(-1, num_labels), labels.view(-1), ignore_index=-100)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))
    raise ValueError(
        f"problem_type {problem!r} is not one of regression, single_label_classification, "
        "multi_label_classification"
    )
