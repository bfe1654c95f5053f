"""The small arithmetic + zodiac dataset many tests train on (hardcore format, explicit val split)."""

from __future__ import annotations

import json
from pathlib import Path

ZODIAC = "鼠牛虎兔龙蛇马羊猴鸡狗猪"


def write_arith_dataset(path: Path, name: str = "test arithmetic") -> Path:
    """64 sums + 12 zodiac facts, hardcore format, an explicit val split (every 8th sum, 2 zodiac facts)."""
    arith = [{"input": f"{a} + {b} = ?", "output": str(a + b)} for a in range(8) for b in range(8)]
    zodiac = [{"input": f"{z}后面是什么生肖？", "output": ZODIAC[(i + 1) % 12]} for i, z in enumerate(ZODIAC)]
    val = [r["input"] for i, r in enumerate(arith) if i % 8 == 3] + [zodiac[4]["input"], zodiac[9]["input"]]
    doc = {
        "metadata": {"name": name, "splits": {"val": val}},
        "data": {"arithmetic": arith, "zodiac": zodiac},
    }
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path
