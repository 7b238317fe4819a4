"""`ember <command> [--config FILE] [--a.b=value ...]`.

Each command is a recipe module with a `Config` dataclass and `main(cfg)`; this file only maps
command names to modules (imported lazily, so `ember --help` is instant) and parses the config.
"""

from __future__ import annotations

import importlib
import sys

# command words -> (recipe module, one-line summary)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("pretrain",): ("ember.recipes.pretrain", "train a model from scratch on token shards (the main job)"),
    ("dpo",): ("ember.recipes.dpo", "align a checkpoint on preference pairs (DPO, IPO, hinge, robust)"),
    ("grpo",): ("ember.recipes.grpo", "online RL with GRPO: rollouts from the policy, rewards by function or model"),
    ("finetune",): ("ember.recipes.finetune", "fine-tune a checkpoint on instruction data (full or LoRA)"),
    ("classify", "train"): ("ember.recipes.classify_train", "train a text classifier on a checkpoint's body"),
    ("classify", "eval"): ("ember.recipes.classify_eval", "accuracy, per-class P/R/F1 and a confusion matrix"),
    ("classify", "predict"): ("ember.recipes.classify_predict", "label texts with a classifier checkpoint"),
    ("generate",): ("ember.recipes.generate", "generate text from a checkpoint"),
    ("chat",): ("ember.recipes.chat", "chat with a checkpoint interactively"),
    ("serve",): ("ember.recipes.serve", "serve a checkpoint over an OpenAI-compatible HTTP API"),
    ("evaluate",): ("ember.recipes.evaluate", "score a checkpoint on tasks: MMLU, perplexity, QA, HumanEval, safety"),
    ("convert",): ("ember.recipes.convert", "convert checkpoints to/from Hugging Face format"),
    ("quantize",): ("ember.recipes.quantize", "weight-only int8 / int4 quantization of a checkpoint"),
    ("reward", "train"): ("ember.recipes.reward_train", "train a reward model on preference pairs"),
    ("reward", "score"): ("ember.recipes.reward_score", "score prompt + completion pairs with a reward model"),
    ("plan",): ("ember.recipes.plan", "memory per GPU and step time of every training layout, ranked"),
    ("model", "info"): ("ember.recipes.model_info", "parameters, FLOPs and memory of a preset or checkpoint"),
    ("tokenizer", "train"): ("ember.recipes.tokenizer_train", "train a byte-level BPE tokenizer"),
    ("data", "prepare"): ("ember.recipes.data_prepare", "clean, filter, dedup, scrub and tokenize text into shards"),
    ("plot",): ("ember.recipes.plot", "plot a run's metrics to PNG curves"),
}


def _usage() -> str:
    width = max(len(" ".join(k)) for k in COMMANDS)
    lines = ["usage: ember <command> [--config FILE] [--a.b=value ...]", "", "commands:"]
    lines += [f"  {' '.join(k):<{width}}  {summary}" for k, (_, summary) in COMMANDS.items()]
    lines += [f"  {'lm-eval':<{width}}  lm-evaluation-harness's command line with --model ember (in process)"]
    lines += ["", "Run `ember <command> --help` for a command's options (with their defaults)."]
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for words in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(words)]) == words:
            return words, argv[len(words):]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from ember import __version__
        print(f"ember {__version__}")
        return 0
    if argv[0] == "lm-eval":  # lm-eval's own command line, with `--model ember` registered
        try:
            from ember.eval.harness import main as lm_eval_main
        except ImportError as e:
            print(f"ember lm-eval: needs lm-evaluation-harness ({e}). HINT: pip install lm-eval", file=sys.stderr)
            return 1
        return lm_eval_main(argv[1:])
    found = _match(argv)
    if found is None:
        subs = [" ".join(k) for k in COMMANDS if len(k) > 1 and k[0] == argv[0]]
        if subs:
            given = f" '{argv[1]}'" if len(argv) > 1 and not argv[1].startswith("-") else ""
            print(f"ember {argv[0]}: unknown or missing subcommand{given}; expected one of: "
                  + ", ".join(f"ember {c}" for c in subs), file=sys.stderr)
            return 2
        import difflib

        close = difflib.get_close_matches(argv[0], sorted({k[0] for k in COMMANDS}), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"ember: unknown command '{' '.join(argv[:2])}'{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    words, rest = found
    recipe = importlib.import_module(COMMANDS[words][0])
    from ember.config import ConfigError, parse
    from ember.errors import EmberError

    try:
        cfg = parse(recipe.Config, rest, prog="ember " + " ".join(words), description=recipe.__doc__)
    except ConfigError as e:
        print(f"ember {' '.join(words)}: config error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # tyro printed --help, or a flag error naming the field (exit 2)
        return int(e.code or 0)
    try:
        result = recipe.main(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except EmberError as e:
        msg, prefix = str(e), f"ember {' '.join(words)}: "
        print(prefix + "error: " + (msg[len(prefix):] if msg.startswith(prefix) else msg), file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
