"""An example reward for --reward_fn: the exact answer, plus a small bonus for a completion that ends cleanly.

    python algorithms/grpo.py --reward_fn docs/reward_example.py:answer_with_format_bonus

The contract (docs/operations.md#your-own-reward-function): NAME(completion: str, answer: str) -> float, a finite
number; the completion's text (special tokens dropped) and the example's reference answer.
"""


def answer_with_format_bonus(completion: str, answer: str) -> float:
    """1 for the exact answer; 0.1 for a wrong answer that is at least a bare number (the format); else 0."""
    text = completion.strip()
    if text == answer.strip():
        return 1.0
    if text.lstrip("-").isdigit():
        return 0.1
    return 0.0
