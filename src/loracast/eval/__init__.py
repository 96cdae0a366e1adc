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

from loracast.eval.arithmetic import (  # noqa: E402
    GenerationExample,
    GenerationResult,
    arithmetic_splits,
    arithmetic_training_pairs,
    evaluate_generation,
    exact_match,
    generate_answers,
)
from loracast.eval.language_modeling import (  # noqa: E402
    LanguageModelingResult,
    bits_per_byte,
    evaluate_language_modeling,
)
from loracast.eval.user_tasks import (  # noqa: E402
    ChoiceExample,
    UserTask,
    evaluate_user_task,
    load_user_task,
    read_user_examples,
)

__all__ += [
    "ChoiceExample",
    "GenerationExample",
    "GenerationResult",
    "LanguageModelingResult",
    "UserTask",
    "arithmetic_splits",
    "arithmetic_training_pairs",
    "bits_per_byte",
    "evaluate_generation",
    "evaluate_language_modeling",
    "evaluate_user_task",
    "exact_match",
    "generate_answers",
    "load_user_task",
    "read_user_examples",
]

from loracast.eval.metrics import (  # noqa: E402
    bootstrap_ci,
    bootstrap_mean_ci,
    gain_recovered,
    negative_flips,
    retained,
    seed_summary,
)
from loracast.eval.shakespeare import (  # noqa: E402
    load_shakespeare_passages,
    load_shakespeare_plays,
    shakespeare_archive,
    shakespeare_splits,
    shakespeare_training_pairs,
)

__all__ += [
    "bootstrap_ci",
    "bootstrap_mean_ci",
    "gain_recovered",
    "load_shakespeare_passages",
    "load_shakespeare_plays",
    "negative_flips",
    "retained",
    "seed_summary",
    "shakespeare_archive",
    "shakespeare_splits",
    "shakespeare_training_pairs",
]
