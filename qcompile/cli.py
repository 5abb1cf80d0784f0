"""The ``qcompile`` console script.

    qcompile bench [ARGS]     kernel benchmark (python -m benchmarks.kernels ARGS)
    qcompile e2e [ARGS]       end-to-end decode/prefill benchmark (python -m benchmarks.e2e ARGS)
    qcompile explain [--config FILE] [--layers N]
                              the quantization plan of the demo Llama model under a config

The benchmarks live in the source checkout's ``benchmarks/`` folder, which is not part of the
installed package: ``bench`` and ``e2e`` find it through ``$QCOMPILE_SOURCE`` or next to an
editable install, and fail with a message saying so when there is none.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

SOURCE_ENV = "QCOMPILE_SOURCE"

COMMANDS = {
    "bench": ("benchmarks.kernels", "kernel benchmark: qcompile kernels vs cuBLAS bf16, bitsandbytes, roofline"),
    "e2e": ("benchmarks.e2e", "end-to-end decode/prefill benchmark of a Llama-style model"),
    "explain": (None, "print the quantization plan of the demo Llama model under a config"),
}


def find_source_checkout() -> Path | None:
    """The repository root holding ``benchmarks/kernels.py``: $QCOMPILE_SOURCE, the editable install's
    source tree, or the current directory, in that order; None when none of them has it."""
    candidates = []
    if os.environ.get(SOURCE_ENV):
        candidates.append(Path(os.environ[SOURCE_ENV]).expanduser())
    candidates.append(Path(__file__).resolve().parent.parent)  # editable install: <repo>/qcompile/cli.py
    candidates.append(Path.cwd())
    for root in candidates:
        if (root / "benchmarks" / "kernels.py").is_file() and (root / "benchmarks" / "__init__.py").is_file():
            return root.resolve()
    return None


def _benchmark_main(module: str) -> Callable[..., int]:
    root = find_source_checkout()
    if root is None:
        raise SystemExit(
            "qcompile: the benchmarks are not part of the installed package and no source checkout was found. "
            f"Clone the qcompile repository and run from its root, or set {SOURCE_ENV}=/path/to/checkout "
            "(the folder that holds benchmarks/kernels.py)."
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != root / "benchmarks":
        raise SystemExit(f"qcompile: a different 'benchmarks' package is already imported ({loaded.__file__}); "
                         f"run from {root} or set {SOURCE_ENV}")
    return importlib.import_module(module).main


def _explain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qcompile explain", description=COMMANDS["explain"][1])
    parser.add_argument("--config", default=None, help="qcompile or bitsandbytes JSON/TOML (default: the demo's)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)

    import torch

    import qcompile
    from qcompile.demo import SEED_CONFIG, tiny_llama

    model = tiny_llama(args.layers, args.hidden)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    print(qcompile.explain(model, ids, config=args.config or str(SEED_CONFIG)))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:{width}s}  {help_}" for name, (_, help_) in COMMANDS.items()]
        text = "usage: qcompile {" + ",".join(COMMANDS) + "} [ARGS]\n\ncommands:\n" + "\n".join(lines)
        text += "\n\n`qcompile COMMAND --help` lists a command's arguments."
        if argv and argv[0] not in ("-h", "--help"):
            print(f"qcompile: unknown command {argv[0]!r}\n\n{text}", file=sys.stderr)
            return 2
        print(text)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "explain":
        return _explain(rest)
    return _benchmark_main(COMMANDS[command][0])(rest, prog=f"qcompile {command}")


if __name__ == "__main__":
    raise SystemExit(main())
