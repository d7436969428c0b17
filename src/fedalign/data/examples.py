"""Containers of labelled examples: text classification and multiple choice.

:class:`TextDataset` holds texts with class ids; :class:`MultipleChoiceDataset` (a
:class:`TextDataset` whose "text" is the context and whose "label" is the group used to
partition, e.g. an MMLU subject) adds the choices and the index of the correct one, so the
partitioners and the balanced hold-out work on both unchanged. :class:`DataSplits` is the
pooled training data plus the global test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextDataset:
    """Texts with integer class labels.

    Parameters
    ----------
    texts : list of str
        One text per example.
    labels : numpy.ndarray
        Class ids, converted to int64 of shape ``(N,)``; each in ``[0, len(label_names))``.
    label_names : list of str
        Name of each class id.

    Raises
    ------
    ValueError
        If the lengths disagree or a label is out of range.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]

    def __post_init__(self) -> None:
        self.texts = list(self.texts)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.label_names = [str(name) for name in self.label_names]
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.label_names)
        ):
            raise ValueError(
                f"labels must lie in [0, {len(self.label_names)}) "
                f"(got {self.labels.min()}..{self.labels.max()})"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(label_names)`` (some may have no example)."""
        return len(self.label_names)

    def subset(self, indices: np.ndarray) -> TextDataset:
        """Return the examples at ``indices`` (in that order), sharing ``label_names``.

        Parameters
        ----------
        indices : numpy.ndarray
            Integer positions into this dataset.

        Returns
        -------
        TextDataset
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return TextDataset(
            texts=[self.texts[i] for i in idx.tolist()],
            labels=self.labels[idx],
            label_names=list(self.label_names),
        )

    def class_counts(self) -> np.ndarray:
        """Return the number of examples per class, shape ``(num_classes,)`` int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


@dataclass
class DataSplits:
    """The pooled training data and the global test set.

    Parameters
    ----------
    train : TextDataset
        Pooled training data, to be partitioned across clients.
    test : TextDataset
        Global test set, class-balanced when held out here; never given to clients.
    notes : list of str, default empty
        What the user should know about the data (records dropped from a file, labels
        that appear only in the test split); each is also logged as a warning.
    spare_test : TextDataset or None, default None
        The held-out examples left out of ``test`` by ``data.max-test-examples`` (never
        evaluated on): the server's probe pool for ``strategy.semantic-privacy =
        public-probe``. None when nothing was left out.
    validation : TextDataset or None, default None
        The server's validation set, held out from the training pool before partitioning
        (``data.validation-examples``); never given to clients. None when not asked for.
    """

    train: TextDataset
    test: TextDataset
    notes: list[str] = field(default_factory=list)
    spare_test: TextDataset | None = None
    validation: TextDataset | None = None


@dataclass
class MultipleChoiceDataset(TextDataset):
    """Multiple-choice examples: a context, its choices and the index of the correct one.

    ``texts`` holds the contexts (the question, or the start of a story) and ``labels`` /
    ``label_names`` the *group* of each example (an MMLU subject, a HellaSwag activity):
    the axis the partitioners skew and the hold-out balances. The answer is not a class.

    Parameters
    ----------
    texts : list of str
        Contexts, one per example.
    labels : numpy.ndarray
        Group ids ``(N,)``, each in ``[0, len(label_names))``.
    label_names : list of str
        Name of each group.
    choices : list of list of str
        The candidate continuations of each example (at least two each).
    answers : numpy.ndarray
        Index of the correct choice of each example, int64 ``(N,)``.

    Raises
    ------
    ValueError
        If the lengths disagree, an example has fewer than two choices or an answer is out
        of its choices' range.
    """

    choices: list[list[str]]
    answers: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        self.choices = [[str(c) for c in row] for row in self.choices]
        self.answers = np.asarray(self.answers, dtype=np.int64).reshape(-1)
        if not len(self.choices) == len(self.answers) == len(self.texts):
            raise ValueError(
                f"{len(self.texts)} contexts, {len(self.choices)} choice lists and "
                f"{len(self.answers)} answers"
            )
        for row, (options, answer) in enumerate(zip(self.choices, self.answers, strict=True)):
            if len(options) < 2:
                raise ValueError(f"example {row} has {len(options)} choice(s); at least 2 needed")
            if not 0 <= answer < len(options):
                raise ValueError(
                    f"example {row}: answer {int(answer)} is not in [0, {len(options)})"
                )

    @property
    def max_choices(self) -> int:
        """Most choices of any example (0 when empty)."""
        return max((len(row) for row in self.choices), default=0)

    def subset(self, indices: np.ndarray) -> MultipleChoiceDataset:
        """Return the examples at ``indices`` (in that order), sharing ``label_names``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return MultipleChoiceDataset(
            texts=[self.texts[i] for i in idx.tolist()],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            choices=[list(self.choices[i]) for i in idx.tolist()],
            answers=self.answers[idx],
        )
