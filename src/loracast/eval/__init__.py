"""Evaluation tasks and metrics: choice scoring by log-likelihood and tweet sentiment."""

from loracast.eval.classification import (
    ClassificationExample,
    accuracy,
    completion_token_log_probs,
    encode_completions,
    encode_prompts,
    predictions,
    score_choices,
)
from loracast.eval.sentiment import (
    PROMPT_TEMPLATE,
    SENTIMENT_CHOICES,
    SENTIMENT_LABELS,
    SentimentResult,
    TaskSplits,
    clean_text,
    evaluate_sentiment,
    format_prompt,
    load_sentiment_examples,
    sentiment_csv_path,
    sentiment_splits,
    sentiment_training_pairs,
)

__all__ = [
    "PROMPT_TEMPLATE",
    "SENTIMENT_CHOICES",
    "SENTIMENT_LABELS",
    "ClassificationExample",
    "SentimentResult",
    "TaskSplits",
    "accuracy",
    "clean_text",
    "completion_token_log_probs",
    "encode_completions",
    "encode_prompts",
    "evaluate_sentiment",
    "format_prompt",
    "load_sentiment_examples",
    "predictions",
    "score_choices",
    "sentiment_csv_path",
    "sentiment_splits",
    "sentiment_training_pairs",
]
