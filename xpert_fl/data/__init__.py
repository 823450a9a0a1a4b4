"""Corpora: the on-disk style-corpus format, built-in corpora, mixing and user partitions."""

from xpert_fl.data.corpus import NEUTRAL, CorpusError, Sample, StyleCorpus, load_corpus, write_corpus
from xpert_fl.data.mixing import similarity_mixture, split_roles, train_test_split, user_samples

__all__ = [
    "NEUTRAL",
    "CorpusError",
    "Sample",
    "StyleCorpus",
    "load_corpus",
    "write_corpus",
    "similarity_mixture",
    "split_roles",
    "train_test_split",
    "user_samples",
]
