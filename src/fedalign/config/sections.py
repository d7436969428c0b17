"""``[data]``, ``[partition]``, ``[train]`` and ``[run]``: each section a dataclass that
validates itself."""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass

from fedalign.config.checks import at_least_one, in_unit_interval, one_of
from fedalign.errors import ConfigError

MULTIPLE_CHOICE_DATASETS = ("mmlu", "hellaswag")
"""Named multiple-choice sources of ``data.dataset`` (scored by a causal LM)."""
PARTITION_METHODS = ("dirichlet", "pathological", "iid")
PRECISIONS = ("fp32", "bf16", "auto")
"""``run.precision``: float32, bfloat16 autocast, or bf16 where the device supports it."""
FROZEN_DTYPES = ("fp32", "bf16")
"""``run.frozen-dtype``: storage of the parameters that do not train."""
DEVICE_NAMES = ("cpu", "auto", "cuda", "cuda:N")
"""Accepted forms of ``run.device`` (N: a GPU index)."""


@dataclass
class DataConfig:
    """Which labelled text to use.

    Parameters
    ----------
    dataset : str, default "wordnet-supersense"
        Text classification: ``wordnet-supersense`` (embedded), ``ag_news`` (Hugging Face
        hub), or a path to a ``.csv`` / ``.jsonl`` file. Multiple choice: ``mmlu``
        (``cais/mmlu``; partitioned by subject) or ``hellaswag`` (``Rowan/hellaswag``;
        partitioned by activity label).
    text_column : str, default "text"
    label_column : str, default "label"
    max_train_examples : int, default 0
        Cap on the pooled training examples before partitioning (0 = no cap).
    max_test_examples : int, default 0
        Cap on the global test set (0 = no cap).
    test_fraction : float, default 0.1
        Fraction held out as the balanced global test set when the source has no test split.
    validation_examples : int, default 0
        Examples held out (class-balanced, seeded) from the training pool before the cap
        and the partition as the server's validation set (0 = none); never given to
        clients, evaluated every round as ``validation_accuracy`` (tuning without the test
        set).
    encoding : str, default "utf-8"
        Text encoding of a ``.csv`` / ``.jsonl`` / ``.json`` file (any Python codec name; a
        leading UTF-8 byte-order mark is skipped).
    path : str, default ""
        For ``mmlu`` / ``hellaswag``: a local ``.jsonl`` / ``.json`` file in the hub
        dataset's schema, read instead of the hub (empty = the hub, through
        ``datasets.load_dataset``). ``sample`` names the small sample in that schema
        shipped with the package (offline demos and tests).
    """

    dataset: str = "wordnet-supersense"
    text_column: str = "text"
    label_column: str = "label"
    max_train_examples: int = 0
    max_test_examples: int = 0
    test_fraction: float = 0.1
    validation_examples: int = 0
    encoding: str = "utf-8"
    path: str = ""

    @property
    def task(self) -> str:
        """``multiple-choice`` for :data:`MULTIPLE_CHOICE_DATASETS`, else ``classification``."""
        return "multiple-choice" if self.dataset in MULTIPLE_CHOICE_DATASETS else "classification"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``data.*`` key out of range. Whether
        ``dataset`` and ``path`` name a source that exists is checked by
        :func:`fedalign.data.load_data`, which runs these checks too."""
        in_unit_interval("data.test-fraction", self.test_fraction, "(0, 1)")
        for key, value in (
            ("data.max-train-examples", self.max_train_examples),
            ("data.max-test-examples", self.max_test_examples),
            ("data.validation-examples", self.validation_examples),
        ):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0 (0 = none; got {value})")
        check_encoding(self.encoding)


def check_encoding(encoding: str) -> str:
    """The canonical name of the Python codec ``encoding`` (``data.encoding``).

    Raises
    ------
    ConfigError
        When Python knows no such codec.
    """
    try:
        return codecs.lookup(encoding).name
    except LookupError as error:
        raise ConfigError(
            f"data.encoding must be a Python codec name such as 'utf-8' or 'latin-1' "
            f"(got {encoding!r})"
        ) from error


@dataclass
class PartitionConfig:
    """How the training pool is split across clients.

    Parameters
    ----------
    method : str, default "dirichlet"
        ``dirichlet`` (label skew with concentration ``alpha``), ``pathological``
        (``classes_per_client`` classes each) or ``iid``.
    num_clients : int, default 10
    alpha : float, default 0.1
    classes_per_client : int, default 2
    min_client_size : int, default 10
    local_test_fraction : float, default 0.2
        Fraction of each client's share kept as its local test split.
    """

    method: str = "dirichlet"
    num_clients: int = 10
    alpha: float = 0.1
    classes_per_client: int = 2
    min_client_size: int = 10
    local_test_fraction: float = 0.2

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``partition.*`` key out of range (the
        checks that need no data; :func:`fedalign.data.partition_labels` runs them too)."""
        one_of("partition.method", self.method, PARTITION_METHODS)
        at_least_one("partition.num-clients", self.num_clients)
        if not self.alpha > 0:
            raise ConfigError(
                f"partition.alpha must be > 0 (got {self.alpha}); small values such as 0.1 "
                "give strong label skew, large values such as 100 are close to iid"
            )
        at_least_one("partition.classes-per-client", self.classes_per_client)
        if self.min_client_size < 0:
            raise ConfigError(
                f"partition.min-client-size must be >= 0 (got {self.min_client_size})"
            )
        in_unit_interval("partition.local-test-fraction", self.local_test_fraction, "[0, 1)")


@dataclass
class TrainConfig:
    """Local training on each client.

    Parameters
    ----------
    lr : float, default 1e-4
    weight_decay : float, default 0.0
    batch_size : int, default 16
    local_epochs : int, default 1
    local_steps : int, default 0
        When > 0, train exactly this many steps instead of ``local_epochs`` epochs.
    grad_clip : float, default 1.0
        Max gradient norm (0 disables clipping).
    keep_optimizer_state : bool, default False
        Keep each client's AdamW state between its rounds (costs memory per client).
    label_calibration : float, default 0.0
        FedLC's ``tau`` (Zhang et al., ICML 2022): each client trains on the cross-entropy
        of its logits shifted by ``-tau * n_c ** -0.25``, ``n_c`` its own examples of class
        ``c`` (classes it has none of leave its softmax); a label-skew correction any
        strategy can use. 0 = plain cross-entropy; classification only.
    """

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    local_epochs: int = 1
    local_steps: int = 0
    grad_clip: float = 1.0
    keep_optimizer_state: bool = False
    label_calibration: float = 0.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``train.*`` key out of range."""
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0 (got {self.lr})")
        if not (self.label_calibration >= 0 and math.isfinite(self.label_calibration)):
            raise ConfigError(
                f"train.label-calibration must be a finite number >= 0 (0 = off; "
                f"got {self.label_calibration})"
            )
        at_least_one("train.batch-size", self.batch_size)
        if self.local_epochs < 1 and self.local_steps < 1:
            raise ConfigError("train.local-epochs or train.local-steps must be >= 1")


@dataclass
class RunConfig:
    """Where records go and how chatty the run is.

    Parameters
    ----------
    out : str, default ""
        Run folder; empty means ``runs/<strategy>-<timestamp>``.
    progress : bool, default True
        Show progress bars.
    threads : int, default 0
        ``torch.set_num_threads`` (0 keeps torch's default).
    device : str, default "cpu"
        Where the model, every batch and the client-side statistics live: ``cpu``,
        ``cuda`` (the current GPU), ``cuda:N`` or ``auto`` (``cuda`` when a GPU is
        visible, else ``cpu``). Parameters and statistics returned to the server are CPU
        tensors: aggregation runs on the CPU whatever the device.
    precision : str, default "fp32"
        ``fp32``, ``bf16`` (bfloat16 autocast of forward passes; parameters, gradients and
        optimiser state stay float32) or ``auto`` (``bf16`` on a GPU that supports it,
        else ``fp32``).
    frozen_dtype : str, default "fp32"
        Storage of the parameters that do not train: ``fp32`` or ``bf16`` (halves the memory
        of a frozen base model, e.g. under ``model.trainable = lora``; needs bfloat16
        autocast, ``run.precision`` ``bf16`` or ``auto`` on a GPU). Trainable parameters,
        their gradients and optimiser state stay float32.
    deterministic : bool, default False
        ``torch.use_deterministic_algorithms(True, warn_only=True)`` and
        ``CUBLAS_WORKSPACE_CONFIG=:4096:8``: bitwise-repeatable GPU runs where torch has
        deterministic kernels (a warning names each op that has none).
    workers : int, default 1
        Simulator only: processes that train a round's clients in parallel (1 = in this
        process, one client after another). Each worker builds the model and prepares the
        data once, then trains the clients it is handed with ``max(1, threads // workers)``
        torch threads; results are aggregated in client order, bitwise equal to 1 worker
        at the same threads per process (see ``docs/flower.md``, "Parallel clients").
    """

    out: str = ""
    progress: bool = True
    threads: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    frozen_dtype: str = "fp32"
    deterministic: bool = False
    workers: int = 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first ``run.*`` key out of range."""
        check_device_name(self.device)
        one_of("run.precision", self.precision, PRECISIONS)
        one_of("run.frozen-dtype", self.frozen_dtype, FROZEN_DTYPES)
        if self.frozen_dtype == "bf16" and self.precision == "fp32":
            raise ConfigError(
                "run.frozen-dtype 'bf16' needs bfloat16 autocast: run.precision must be one of "
                "['bf16', 'auto'] (got 'fp32')"
            )
        at_least_one("run.workers", self.workers)


def check_device_name(device: str) -> None:
    """Raise :class:`ConfigError` unless ``device`` is ``cpu``, ``auto``, ``cuda`` or
    ``cuda:N`` (whether that GPU exists is checked when the model is placed)."""
    if device in ("cpu", "auto", "cuda"):
        return
    index = device[5:] if device.startswith("cuda:") else ""
    if not (index.isdigit() and index.isascii()):
        raise ConfigError(f"run.device must be one of {list(DEVICE_NAMES)} (got {device!r})")
