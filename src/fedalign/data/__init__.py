"""Data layer: labelled text sources, client partitions and tokenization.

``load_data`` gives the pooled training data and a balanced global test set,
``build_federated_data`` splits the pool across clients (Dirichlet, pathological or iid
label partitions, each with a local test split) and ``tokenize_examples`` turns text into
padded tensors. Multiple-choice data (MMLU, HellaSwag) are partitioned by their group
(subject, activity) and tokenized one sequence per choice.
"""

from fedalign.data.choices import (
    SAMPLE_FILES,
    hellaswag_example,
    load_choices_from_hub,
    mmlu_example,
    sample_path,
)
from fedalign.data.datasets import (
    AG_NEWS_LABELS,
    DATASETS,
    FILE_EXTENSIONS,
    WORDNET_SUPERSENSES,
    WORDNET_VERB_SUPERSENSES,
    FileReport,
    hold_out_validation,
    holdout_balanced_test,
    labels_only_in_test,
    load_ag_news,
    load_data,
    load_text_file,
    load_wordnet_supersense,
    load_wordnet_verb_supersense,
    read_text_file,
)
from fedalign.data.examples import DataSplits, MultipleChoiceDataset, TextDataset
from fedalign.data.partition import (
    ClientSplit,
    FederatedData,
    PartitionReport,
    build_federated_data,
    partition_labels,
)
from fedalign.data.tokenize import (
    TokenizedData,
    pad_token_id,
    tokenize_choices,
    tokenize_dataset,
    tokenize_examples,
)

__all__ = [
    "AG_NEWS_LABELS",
    "DATASETS",
    "FILE_EXTENSIONS",
    "SAMPLE_FILES",
    "WORDNET_SUPERSENSES",
    "WORDNET_VERB_SUPERSENSES",
    "ClientSplit",
    "DataSplits",
    "FederatedData",
    "FileReport",
    "MultipleChoiceDataset",
    "PartitionReport",
    "TextDataset",
    "TokenizedData",
    "build_federated_data",
    "hellaswag_example",
    "hold_out_validation",
    "holdout_balanced_test",
    "labels_only_in_test",
    "load_ag_news",
    "load_choices_from_hub",
    "load_data",
    "load_text_file",
    "load_wordnet_supersense",
    "load_wordnet_verb_supersense",
    "mmlu_example",
    "pad_token_id",
    "partition_labels",
    "read_text_file",
    "sample_path",
    "tokenize_choices",
    "tokenize_dataset",
    "tokenize_examples",
]
