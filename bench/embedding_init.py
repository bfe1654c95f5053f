"""Does the model learn to read its source? One HLBD module, a small APT model, several embedding init scales.

The spec initialises token embeddings from N(0, 0.02) and adds unscaled sinusoidal positions (norm sqrt(d/2)), so
at the start a token's identity is a few percent of the encoder input. This trains the same small model (width 64,
2+2 layers, autopoietic attention unless ``--plain``) on one module of the default HLBD Hardcore data for each
``--stds`` value, through the Playground loop on CPU, and reports greedy exact match on train and val.

Usage: python bench/embedding_init.py [--module zodiac|all] [--epochs 30] [--stds 0.02 0.5 1.0] [--plain] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", default="zodiac")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.5, 1.0])
    p.add_argument(
        "--plain", action="store_true", help="plain attention instead of the autopoietic transform"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.epochs < 1 or any(s <= 0 for s in args.stds):
        p.error("--epochs must be >= 1 and every --stds value > 0")
    if args.out is not None and not args.out.parent.is_dir():
        p.error(f"--out {args.out}: folder {args.out.parent} does not exist")

    import torch

    from apt_model.backends import TrainRequest
    from apt_model.config import DataConfig, TrainConfig, model_preset
    from apt_model.data import generate, write_dataset
    from apt_model.io import atomic_write_text
    from apt_model.training.loop import run_training
    from apt_model.verify import verify_model

    torch.set_num_threads(1)
    doc = generate("hardcore", seed=42, size="default")
    if args.module != "all" and args.module not in doc["data"]:
        p.error(f"--module: choose all or one of {', '.join(doc['data'])}")
    modules = list(doc["data"]) if args.module == "all" else [args.module]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / f"{args.module}.json"
        data = {
            "metadata": {"name": f"HLBD Hardcore, {args.module}"},
            "data": {m: doc["data"][m] for m in modules},
        }
        write_dataset(data, dataset)
        for std in args.stds:
            model = model_preset(
                "tiny", d_model=64, n_heads=4, d_ff=256, dropout=0.0, use_autopoietic=not args.plain,
                embedding_init_std=std,
            )  # fmt: skip
            train = TrainConfig(
                epochs=args.epochs, batch_size=32, grad_accum=1, lr=args.lr, t0=args.epochs, warmup_steps=50,
                save_interval=10_000, eval_every=args.epochs, compile="off", precision="fp32", seed=42,
            )  # fmt: skip
            request = TrainRequest(
                model=model, train=train, data=DataConfig(max_src_len=40, max_tgt_len=24), dataset=dataset,
                out_dir=Path(tmp) / f"run_{std}", tracking_uri="none", options={"progress": False},
            )  # fmt: skip
            started = time.perf_counter()
            result = run_training(request, backend="playground")
            seconds = time.perf_counter() - started
            report = json.loads(Path(result.report).read_text(encoding="utf-8"))
            verified = {s: verify_model(result.final_model, dataset, split=s) for s in ("train", "val")}
            rows.append(
                {
                    "embedding_init_std": std,
                    "first_epoch_loss": report["epochs"][0]["train_loss"],
                    "last_epoch_loss": report["epochs"][-1]["train_loss"],
                    "exact_train": verified["train"].overall["exact"],
                    "exact_val": verified["val"].overall["exact"],
                    "exact_val_modules": {m: r["exact"] for m, r in verified["val"].modules.items()},
                    "train_seconds": round(seconds, 1),
                }
            )
            r = rows[-1]
            print(
                f"std {std:<5}: loss {r['first_epoch_loss']:.3f} -> {r['last_epoch_loss']:.3f}, exact train "
                f"{r['exact_train']:.1%}, val {r['exact_val']:.1%} ({r['train_seconds']} s)",
                flush=True,
            )
    result_doc = {
        "bench": "embedding_init",
        "module": args.module,
        "epochs": args.epochs,
        "attention": "plain" if args.plain else "autopoietic",
        "lr": args.lr,
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(result_doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
