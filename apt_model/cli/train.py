"""``apt train``: the unified launcher over the backend registry.

    apt train --backend playground --dataset HLBD_Hardcore_Full.json --epochs 100 \\
              --save-dir hlbd_playground --save-interval 25 [--resume hlbd_playground/checkpoint_epoch_50.pt]
    apt train --list-backends

Where the settings come from, lowest to highest: the model preset (``--preset``, default ``playground``) or, when
resuming, the checkpoint's saved model/train/data configs; then the ``model``/``train``/``data`` sections of
``--config FILE`` (JSON or YAML; ``model`` may name a ``preset``); then explicit flags. When resuming, the model
config is the checkpoint's: an explicit preset / model flag / model section that disagrees with it is an error.

Backend-specific flags come from each registered backend's ``add_arguments``; a flag of another backend than the
chosen one is refused. Everything is validated (configs, dataset, checkpoint, save dir) before anything is written;
an error prints one line and exits 2. At the end the ``TrainResult`` manifest is written to
``<save-dir>/train_result.json`` and printed as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from apt_model.backends import BACKENDS, Backend, TrainRequest, describe_backends, get_backend
from apt_model.config import MODEL_PRESETS, DataConfig, TrainConfig, model_preset
from apt_model.errors import CheckpointError, ConfigError
from apt_model.io import atomic_write_json

DEFAULT_PRESET = "playground"

# flag dest -> config field, per section. Defaults are None so that "given" can be told from "default".
MODEL_FLAGS = {
    "d_model": "d_model",
    "n_heads": "n_heads",
    "n_encoder_layers": "n_encoder_layers",
    "n_decoder_layers": "n_decoder_layers",
    "d_ff": "d_ff",
    "dropout": "dropout",
    "max_len": "max_len",
    "embedding_init_std": "embedding_init_std",
}
TRAIN_FLAGS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "gradient_accumulation": "grad_accum",
    "lr": "lr",
    "min_lr": "min_lr",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
    "clip_grad_norm": "clip_grad_norm",
    "decay_embeddings": "decay_embeddings",
    "warmup_steps": "warmup_steps",
    "dropout_epochs": "dropout_epochs",
    "worked_steps_epochs": "worked_steps_epochs",
    "worked_steps_ramp": "worked_steps_ramp",
    "t0": "t0",
    "t_mult": "t_mult",
    "seed": "seed",
    "precision": "precision",
    "label_smoothing": "label_smoothing",
    "save_interval": "save_interval",
    "eval_every": "eval_every",
    "log_every": "log_every",
    "nan_policy": "nan_policy",
    "compile": "compile",
    "cuda_graphs": "cuda_graphs",
    "transform_kernel": "transform_kernel",
}
DATA_FLAGS = {"max_src_len": "max_src_len", "max_tgt_len": "max_tgt_len", "repeat": "repeat"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an APT model on a backend",
        description="Train an APT model on one of the registered backends.",
        conflict_handler="resolve",  # two backends may declare the same flag (e.g. --fp16) with one meaning
    )
    p.add_argument("--backend", choices=list(BACKENDS), default="playground", help="training backend")
    p.add_argument(
        "--list-backends", action="store_true", help="list the backends and whether they are installed"
    )
    p.add_argument("--dataset", type=Path, help="HLBD dataset JSON (hardcore or full format)")
    p.add_argument("--save-dir", type=Path, default=None, help="output folder (default hlbd_<backend>)")
    p.add_argument(
        "--resume", type=Path, default=None, help="checkpoint_epoch_N.pt (or final_model.pt) to continue"
    )
    p.add_argument("--config", type=Path, default=None, help="JSON/YAML with model/train/data sections")
    p.add_argument(
        "--preset", choices=list(MODEL_PRESETS), default=None, help=f"model preset (default {DEFAULT_PRESET})"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow a fresh run into a save dir that holds a run"
    )

    m = p.add_argument_group("model")
    m.add_argument("--d-model", type=int, default=None)
    m.add_argument("--n-heads", type=int, default=None)
    m.add_argument("--n-layers", type=int, default=None, help="sets both encoder and decoder layers")
    m.add_argument("--n-encoder-layers", type=int, default=None)
    m.add_argument("--n-decoder-layers", type=int, default=None)
    m.add_argument("--d-ff", type=int, default=None)
    m.add_argument("--dropout", type=float, default=None)
    m.add_argument("--max-len", type=int, default=None, help="longest sequence the model accepts")
    m.add_argument(
        "--embedding-init-std",
        type=float,
        default=None,
        help="std of the token embedding's initial N(0, std) (default 0.02, the spec's; see BENCHMARKS.md)",
    )

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--gradient-accumulation", type=int, default=None, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=None, help="base learning rate of the cosine schedule")
    t.add_argument("--min-lr", type=float, default=None)
    t.add_argument("--weight-decay", type=float, default=None)
    t.add_argument("--adam-beta1", type=float, default=None, help="AdamW's first-moment decay (default 0.9)")
    t.add_argument(
        "--adam-beta2", type=float, default=None, help="AdamW's second-moment decay (default 0.999)"
    )
    t.add_argument(
        "--decay-embeddings",
        action="store_true",
        default=None,
        help="apply --weight-decay to the token embedding too (default: embeddings are not decayed)",
    )
    t.add_argument(
        "--clip-grad-norm", type=float, default=None, help="global gradient-norm clip (default 1.0)"
    )
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument(
        "--dropout-epochs",
        type=int,
        default=None,
        help="dropout only in the first N epochs, then off (default 0: in every epoch)",
    )
    t.add_argument(
        "--worked-steps-epochs",
        type=int,
        default=None,
        help="train HLBD's products of a two-digit multiplier on worked steps (37 × 14 → 148+370=518) for the "
        "first N epochs; the data and the scores stay plain (default 0: off)",
    )
    t.add_argument(
        "--worked-steps-ramp",
        type=int,
        default=None,
        help="then remove the steps evenly over the next N epochs; plain answers after (default 0)",
    )
    t.add_argument("--t0", type=int, default=None, help="cosine restart period T_0 in epochs")
    t.add_argument("--t-mult", type=int, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=None)
    t.add_argument("--label-smoothing", type=float, default=None)
    t.add_argument(
        "--save-interval", type=int, default=None, help="write checkpoint_epoch_N.pt every K epochs"
    )
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument(
        "--log-every", type=int, default=None, help="record the batch loss every N optimizer steps"
    )
    t.add_argument("--nan-policy", choices=("stop", "skip"), default=None)
    t.add_argument("--compile", choices=("auto", "on", "off"), default=None)
    t.add_argument(
        "--cuda-graphs",
        choices=("auto", "step", "loss", "off"),
        default=None,
        help="what the compiled step replays from CUDA graphs: the whole optimizer step (auto's choice in bf16/fp32), "
        "the forward + backward only (auto's choice with fp16), or nothing",
    )
    t.add_argument(
        "--transform-kernel",
        choices=("auto", "triton", "torch"),
        default=None,
        help="autopoietic transform: fused Triton kernels (auto: on CUDA when Triton is installed; sequences up to "
        "64 tokens, longer ones use torch ops) or torch ops",
    )
    t.add_argument("--deterministic", action="store_true", default=None)
    t.add_argument("--no-dbc-dac", action="store_true", help="switch DBC-DAC gradient stabilisation off")
    t.add_argument("--dbc-dac-every", type=int, default=None, help="apply DBC-DAC every N optimizer steps")

    d = p.add_argument_group("data")
    d.add_argument("--max-src-len", type=int, default=None)
    d.add_argument("--max-tgt-len", type=int, default=None)
    d.add_argument(
        "--repeat",
        default=None,
        metavar="MODULE=K[,…]",
        help="show each training pair of MODULE K times an epoch (e.g. zodiac=2,physics=2); validation unchanged",
    )

    k = p.add_argument_group("tracking and output")
    k.add_argument("--tracking-uri", default=None, help="MLflow URI; 'none' turns tracking off")
    k.add_argument("--no-tracking", action="store_true", help="same as --tracking-uri none")
    k.add_argument("--experiment", default="apt", help="MLflow experiment name")
    k.add_argument("--no-progress", action="store_true", help="no progress bar")

    # Backend flags: each backend in its own group; remember which dests it owns to refuse foreign ones.
    owned: dict[str, set[str]] = {}
    common = {a.dest for a in p._actions}
    for name, spec in BACKENDS.items():
        try:
            backend = spec.load()
        except Exception:  # a backend whose module cannot import still shows in --list-backends
            owned[name] = set()
            continue
        owned[name] = _declared_dests(backend, p.add_argument_group(f"{name} backend")) - common
    defaults = {a.dest: a.default for a in p._actions}
    p.set_defaults(handler=run, _backend_dests=owned, _parser_defaults=defaults)


def _declared_dests(backend: Backend, group: argparse._ArgumentGroup) -> set[str]:
    """The dests ``backend.add_arguments`` declares, recorded as it declares them.

    Several backends may declare the same flag (``--fp16``); with ``conflict_handler="resolve"`` the later one
    replaces the earlier action, so ownership cannot be read off the parser's action list afterwards (an
    ``id()`` comparison even breaks when the new action reuses the freed one's address).
    """
    declared: set[str] = set()
    add = group.add_argument

    def recording_add(*args: Any, **kwargs: Any) -> argparse.Action:
        action = add(*args, **kwargs)
        declared.add(action.dest)
        return action

    group.add_argument = recording_add  # type: ignore[method-assign]
    backend.add_arguments(group)  # type: ignore[arg-type]
    return declared


def _list_backends() -> int:
    rows = describe_backends()
    header = ("NAME", "INSTALLED", "EXTRA", "SUMMARY")
    table = [
        (
            r["name"],
            "yes" if r["installed"] else f"no (needs {', '.join(r['missing'])})",
            r["extra"] or "-",
            r["summary"],
        )
        for r in rows
    ]
    widths = [max(len(str(x[i])) for x in [header, *table]) for i in range(3)]
    for row in [header, *table]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    return 0


def _load_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.__class__.__name__})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with model/train/data sections")
    unknown = sorted(set(data) - {"model", "train", "data"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (expected model, train, data)")
    for key, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{path}: section {key!r} must be a mapping")
    return {k: dict(v or {}) for k, v in data.items()}


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """A copy of ``value`` if it is a mapping (or empty); a clear error otherwise — never a TypeError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a mapping (got {type(value).__name__})")
    return dict(value)


def _explicit(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {
        field: getattr(args, dest) for dest, field in mapping.items() if getattr(args, dest, None) is not None
    }


def _model_overrides(args: argparse.Namespace, section: dict[str, Any]) -> dict[str, Any]:
    over = dict(section)
    over.pop("preset", None)
    if args.n_layers is not None:
        over["n_encoder_layers"] = over["n_decoder_layers"] = args.n_layers
    over.update(_explicit(args, MODEL_FLAGS))
    return over


def _check_foreign_flags(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> None:
    owned: dict[str, set[str]] = args._backend_dests
    mine = owned.get(args.backend, set())
    for name, dests in owned.items():
        if name == args.backend:
            continue
        for dest in sorted(dests - mine):
            if getattr(args, dest, None) != parser_defaults.get(dest):
                flag = "--" + dest.replace("_", "-")
                raise ConfigError(f"{flag} is a flag of the {name} backend, not of {args.backend}")


def build_request(args: argparse.Namespace) -> tuple[TrainRequest, Backend]:
    """Turn parsed flags into a ``TrainRequest`` and its backend (whose ``validate`` checks the rest)."""
    if args.dataset is None:
        raise ConfigError("--dataset is required (an HLBD JSON file; make one with `apt data generate`)")
    sections = _load_config_file(args.config) if args.config else {}
    model_section = sections.get("model", {})
    model_over = _model_overrides(args, model_section)
    preset = args.preset or model_section.get("preset")
    if preset is not None and preset not in MODEL_PRESETS:
        raise ConfigError(
            f"{args.config}: model.preset {preset!r} is unknown; choose one of {', '.join(MODEL_PRESETS)}"
        )

    train_base: dict[str, Any] = {}
    data_base: dict[str, Any] = {}
    if args.resume is not None:
        from apt_model.checkpoint import checkpoint_model_config, load_checkpoint

        state = load_checkpoint(args.resume)
        model = checkpoint_model_config(state, args.resume)
        if preset is not None or model_over:
            requested = model_preset(preset or DEFAULT_PRESET, **model_over).replace(
                vocab_size=model.vocab_size, pad_id=model.pad_id
            )
            diff = [
                f"{k}: {v!r} vs checkpoint {model.to_dict()[k]!r}"
                for k, v in requested.to_dict().items()
                if v != model.to_dict()[k]
            ]
            if diff:
                raise CheckpointError(
                    f"{args.resume}: requested model config differs from the checkpoint's ({'; '.join(diff[:3])}); "
                    "when resuming the model config comes from the checkpoint — drop --preset/model flags"
                )
        train_base = _mapping(state.get("train_config"), f"{args.resume}: train_config")
        data_base = _mapping(state.get("data_config"), f"{args.resume}: data_config")
    else:
        model = model_preset(preset or DEFAULT_PRESET, **model_over)

    train_dict = {**train_base, **sections.get("train", {}), **_explicit(args, TRAIN_FLAGS)}
    if args.deterministic:
        train_dict["deterministic"] = True
    dbc = _mapping(train_dict.get("dbc_dac"), "train.dbc_dac")
    if args.no_dbc_dac:
        dbc["enabled"] = False
    if args.dbc_dac_every is not None:
        dbc["every_n_steps"] = args.dbc_dac_every
    if dbc:
        train_dict["dbc_dac"] = dbc
    train = TrainConfig.from_dict(train_dict)
    data = DataConfig.from_dict({**data_base, **sections.get("data", {}), **_explicit(args, DATA_FLAGS)})

    backend = get_backend(args.backend)
    _check_foreign_flags(args, getattr(args, "_parser_defaults", {}))
    options = dict(backend.options_from_args(args))
    # Options of the shared training loop (training.loop.prepare), which every backend runs through.
    if args.no_progress:
        options["progress"] = False
    if args.overwrite:
        options["overwrite"] = True
    out_dir = args.save_dir if args.save_dir is not None else Path(f"hlbd_{args.backend}")
    tracking = "none" if args.no_tracking else args.tracking_uri
    request = TrainRequest(
        model=model,
        train=train,
        data=data,
        dataset=args.dataset,
        out_dir=out_dir,
        resume=args.resume,
        options=options,
        tracking_uri=tracking,
        experiment=args.experiment,
    )
    return request, backend


def _setup_logging() -> None:
    logger = logging.getLogger("apt_model")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    if args.list_backends:
        return _list_backends()
    request, backend = build_request(args)
    backend.validate(request)  # everything checked before any file is written
    _setup_logging()
    result = backend.train(request)
    manifest = result.to_dict()
    atomic_write_json(Path(request.out_dir) / "train_result.json", manifest)
    print(json.dumps(manifest, ensure_ascii=False, sort_keys=True))
    return 0
