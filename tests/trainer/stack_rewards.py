"""A reward that varies on a random model's text, for trainer runs in subprocesses
(``--reward_funcs stack_rewards:vowel_share`` with this folder on PYTHONPATH): the task
rewards are all zero there, which leaves nothing to compare."""


def vowel_share(prompts: list, completions: list[str], **kwargs: object) -> list[float]:
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
