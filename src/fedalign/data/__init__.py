"""Data layer: labelled text sources, client partitions and tokenization.

``load_data`` gives the pooled training data and a balanced global test set,
``build_federated_data`` splits the pool across clients (Dirichlet, pathological or iid
label partitions, each with a local test split) and ``tokenize_dataset`` turns text into
padded tensors.
"""

from fedalign.data.datasets import (
    AG_NEWS_LABELS,
    DATASETS,
    FILE_EXTENSIONS,
    WORDNET_SUPERSENSES,
    DataSplits,
    FileReport,
    TextDataset,
    holdout_balanced_test,
    labels_only_in_test,
    load_ag_news,
    load_data,
    load_text_file,
    load_wordnet_supersense,
    read_text_file,
)
from fedalign.data.partition import (
    ClientSplit,
    FederatedData,
    PartitionReport,
    build_federated_data,
    check_partition_config,
    partition_labels,
)
from fedalign.data.tokenize import TokenizedData, pad_token_id, tokenize_dataset

__all__ = [
    "AG_NEWS_LABELS",
    "DATASETS",
    "FILE_EXTENSIONS",
    "WORDNET_SUPERSENSES",
    "ClientSplit",
    "DataSplits",
    "FederatedData",
    "FileReport",
    "PartitionReport",
    "TextDataset",
    "TokenizedData",
    "build_federated_data",
    "check_partition_config",
    "holdout_balanced_test",
    "labels_only_in_test",
    "load_ag_news",
    "load_data",
    "load_text_file",
    "load_wordnet_supersense",
    "pad_token_id",
    "partition_labels",
    "read_text_file",
    "tokenize_dataset",
]
