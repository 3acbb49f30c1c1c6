"""Scoring a model folder on video benchmarks (``kangaroo eval``): readers of the published
layouts, the benchmarks' prompt templates, the letter read from a reply, and a resumable run."""

from kangaroo.evaluation.benchmarks import READERS, BenchmarkError, Question, extract_letter, read_benchmark
from kangaroo.evaluation.run import evaluate_shard, format_results, summarize

__all__ = ["READERS", "BenchmarkError", "Question", "evaluate_shard", "extract_letter", "format_results",
           "read_benchmark", "summarize"]
