"""Examples ready for the model: token ids, or the cached output of a frozen prefix.

For upcycled encoders whose lower layers are frozen, :func:`compute_prefix_inputs` runs the
frozen prefix once per example, so that every round only runs the trainable top.

Examples stay on the CPU; :meth:`ModelInputs.to` moves a batch to the model's device.
Multiple-choice examples hold one sequence per choice (``(N, K, T)``) and a target mask
marking each choice's tokens (see :mod:`fedalign.client.objectives`).
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
    cached output of the frozen prefix) is set. Multiple choice: ``input_ids``,
    ``attention_mask`` and ``target_mask`` are ``(N, K, T)`` (one sequence per choice) or,
    for the correct choices only, ``(N, T)``; ``labels`` are the correct choices.

    Parameters
    ----------
    attention_mask : Tensor
    labels : Tensor
    input_ids : Tensor or None, default None
    prefix_hidden : Tensor or None, default None
    target_mask : Tensor or None, default None
        Multiple choice: 1 on the choice's tokens (what a causal LM is scored on).
    task : str, default "classification"
        Names the :mod:`~fedalign.client.objectives` objective of these examples.
    """

    attention_mask: Tensor  # (N, T) or (N, K, T)
    labels: Tensor  # (N,)
    input_ids: Tensor | None = None
    prefix_hidden: Tensor | None = None
    target_mask: Tensor | None = None
    task: str = "classification"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _with(self, index: Tensor | slice, length: int | None) -> ModelInputs:
        cut = slice(None) if length is None else slice(None, length)

        def pick(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[index, ..., cut]

        return ModelInputs(
            attention_mask=self.attention_mask[index, ..., cut],
            labels=self.labels[index],
            input_ids=pick(self.input_ids),
            prefix_hidden=(None if self.prefix_hidden is None else self.prefix_hidden[index, cut]),
            target_mask=pick(self.target_mask),
            task=self.task,
        )

    def select(self, indices: Tensor) -> ModelInputs:
        """Rows ``indices``, trimmed to the longest selected sequence."""
        mask = self.attention_mask[indices]
        length = max(int(mask.sum(dim=-1).max().item()), 1) if len(indices) else 1
        return self._with(indices, length)

    def rows(self, indices: Tensor) -> ModelInputs:
        """Rows ``indices`` as they are (no trimming)."""
        return self._with(indices, None)

    def to(self, device: torch.device) -> ModelInputs:
        """The same examples on ``device`` (these very tensors when already there).

        To a GPU the tensors go through pinned memory without blocking, so the host does
        not wait for the GPU's queued work at every batch.
        """

        def move(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.device == device:
                return tensor
            if device.type == "cuda" and tensor.device.type == "cpu":
                return tensor.pin_memory().to(device, non_blocking=True)
            return tensor.to(device)

        moved = move(self.attention_mask), move(self.labels)
        assert moved[0] is not None and moved[1] is not None
        return ModelInputs(
            attention_mask=moved[0],
            labels=moved[1],
            input_ids=move(self.input_ids),
            prefix_hidden=move(self.prefix_hidden),
            target_mask=move(self.target_mask),
            task=self.task,
        )

    def nbytes(self) -> int:
        tensors = [
            self.attention_mask,
            self.labels,
            self.input_ids,
            self.prefix_hidden,
            self.target_mask,
        ]
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
    """Run the frozen prefix once over every example and keep its output (on the CPU)."""
    chunks = []
    device = model.device
    for start in range(0, input_ids.shape[0], batch_size):
        stop = start + batch_size
        with model.autocast():
            hidden = model.prefix(
                input_ids[start:stop].to(device), attention_mask[start:stop].to(device)
            )
        chunks.append(hidden.cpu())
    hidden = torch.cat(chunks) if chunks else torch.zeros(0, input_ids.shape[1], 0)
    return ModelInputs(attention_mask=attention_mask, labels=labels, prefix_hidden=hidden)
