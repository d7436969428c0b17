"""Examples ready for the model: token ids, or the cached output of a frozen prefix.

For upcycled encoders whose lower layers are frozen, :func:`compute_prefix_inputs` runs the
frozen prefix once per example, so that every round only runs the trainable top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedalign.models import MoEModel

Tensor = torch.Tensor


@dataclass
class ModelInputs:
    """Examples ready for the model.

    Exactly one of ``input_ids`` (``(N, T)``) and ``prefix_hidden`` (``(N, T, H)``, the
    cached output of the frozen prefix) is set.
    """

    attention_mask: Tensor  # (N, T)
    labels: Tensor  # (N,)
    input_ids: Tensor | None = None
    prefix_hidden: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, indices: Tensor) -> ModelInputs:
        """Rows ``indices``, trimmed to the longest selected example."""
        mask = self.attention_mask[indices]
        length = max(int(mask.sum(dim=1).max().item()), 1) if len(indices) else 1
        return ModelInputs(
            attention_mask=mask[:, :length],
            labels=self.labels[indices],
            input_ids=None if self.input_ids is None else self.input_ids[indices, :length],
            prefix_hidden=(
                None if self.prefix_hidden is None else self.prefix_hidden[indices, :length]
            ),
        )

    def rows(self, indices: Tensor) -> ModelInputs:
        """Rows ``indices`` as they are (no trimming)."""
        return ModelInputs(
            attention_mask=self.attention_mask[indices],
            labels=self.labels[indices],
            input_ids=None if self.input_ids is None else self.input_ids[indices],
            prefix_hidden=None if self.prefix_hidden is None else self.prefix_hidden[indices],
        )

    def nbytes(self) -> int:
        tensors = [self.attention_mask, self.labels, self.input_ids, self.prefix_hidden]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def forward_logits(model: MoEModel, batch: ModelInputs) -> Tensor:
    """Class logits ``(B, C)`` for a batch, through the cached prefix when there is one."""
    if batch.prefix_hidden is not None:
        return model.classify_from_prefix(batch.prefix_hidden, batch.attention_mask)
    assert batch.input_ids is not None
    return model.classify(batch.input_ids, batch.attention_mask)


@torch.no_grad()
def compute_prefix_inputs(
    model: MoEModel, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, batch_size: int
) -> ModelInputs:
    """Run the frozen prefix once over every example and keep its output."""
    chunks = []
    for start in range(0, input_ids.shape[0], batch_size):
        stop = start + batch_size
        chunks.append(model.prefix(input_ids[start:stop], attention_mask[start:stop]))
    hidden = torch.cat(chunks) if chunks else torch.zeros(0, input_ids.shape[1], 0)
    return ModelInputs(attention_mask=attention_mask, labels=labels, prefix_hidden=hidden)
