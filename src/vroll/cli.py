"""The ``vroll`` command: one entry point, one subcommand per job.

    vroll serve       a vLLM generation server (alias: vroll vllm-serve)
    vroll grpo        GRPO training against a server (or colocated / plain generate)
    vroll online-dpo  Online DPO training
    vroll eval        strict accuracy of a model on a built-in task

Each subcommand parses its own typed config (flags in dash or underscore spelling,
plus ``--config file.yaml``), so ``vroll serve --help`` lists exactly its flags.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """usage: vroll <command> [flags]

commands:
  serve, vllm-serve   run the vLLM generation server (D replicas x T devices, one HTTP API)
  grpo                train with GRPO
  online-dpo          train with Online DPO
  eval                strict accuracy of a model on a built-in task (vroll.evaluate)

'vroll <command> --help' lists a command's flags."""


def _serve(argv: list[str]) -> int:
    from vroll.configs import parse_config
    from vroll.server.config import ServeConfig
    from vroll.server.main import serve

    cfg = parse_config(ServeConfig, argv, "vroll serve", "Serve a model with vLLM for online RL.")
    return serve(cfg)


def _grpo(argv: list[str]) -> int:
    from vroll.trainer.cli import main_grpo

    return main_grpo(argv)


def _online_dpo(argv: list[str]) -> int:
    from vroll.trainer.cli import main_online_dpo

    return main_online_dpo(argv)


def _eval(argv: list[str]) -> int:
    from vroll.evaluate import main as eval_main

    return eval_main(argv)


def commands() -> dict[str, Callable[[list[str]], int]]:
    """Subcommand name -> handler."""
    return {"serve": _serve, "vllm-serve": _serve, "vllm_serve": _serve,
            "grpo": _grpo, "online-dpo": _online_dpo, "online_dpo": _online_dpo, "eval": _eval}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vroll`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0
    handler = commands().get(argv[0])
    if handler is None:
        print(f"vroll: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return handler(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
