"""Reward functions for `ember grpo` demonstrations: each takes (prompts, completions), returns floats."""


def and_rate(prompts, completions):
    """The share of words that are "and" (KJV-style run-on verses), x4, capped at 1: a dense reward the
    bundled model can learn to raise."""
    out = []
    for c in completions:
        words = c.lower().split()
        out.append(min(1.0, 4 * sum(w.strip(",.;:") == "and" for w in words) / max(1, len(words))))
    return out


def brevity(prompts, completions):
    """1 for a reply of at most 10 characters, falling linearly to 0 at 120."""
    return [min(1.0, max(0.0, (120 - len(c)) / 110)) for c in completions]
