"""The README's GPU training recipe is a command users paste: it must parse and build the configs it describes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from apt_model.cli import build_parser
from apt_model.cli.train import build_request

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Training the Playground model on a GPU"


def _recipe_commands() -> list[list[str]]:
    """The `apt …` commands of the README's GPU training section's first bash block, each as argv (no `apt`)."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION) :], re.S)
    assert block, f"no bash block under {SECTION!r}"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("apt ")]


def test_readme_gpu_recipe_parses_into_the_configs_it_documents() -> None:
    commands = _recipe_commands()
    generate = next(argv for argv in commands if argv[:2] == ["data", "generate"])
    data_args = build_parser().parse_args(generate)
    assert (data_args.kind, data_args.size) == ("hardcore", "xxl")

    train = next(argv for argv in commands if argv[0] == "train")
    request, backend = build_request(build_parser().parse_args(train))
    assert backend.name == "playground"
    # The settings the README's table and text attribute to the recipe.
    assert request.model.embedding_init_std == 0.3 and request.model.dropout == 0
    assert (request.train.batch_size, request.train.lr, request.train.weight_decay) == (128, 1e-3, 1.5)
    assert request.train.label_smoothing == 0.05
    assert (request.train.epochs, request.train.t0, request.train.warmup_steps) == (52, 52, 300)
    assert request.data.repeat_counts() == {"zodiac": 3, "physics": 3}
    assert (request.data.max_src_len, request.data.max_tgt_len) == (40, 24)
