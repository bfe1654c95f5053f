"""HLBD Hardcore generator: strict-logic question → answer pairs in five modules.

Output shape is the reference's (``{"metadata": ..., "data": {module: [{"input", "output"}, ...]}}``), so files we
write load wherever the reference's do, plus provenance and the split in ``metadata``:

- ``metadata.splits.val``: the sorted list of validation inputs; every other input is training data.
  ``metadata.splits.rule`` says in words how they were chosen. Loaders of files without ``splits`` (reference files)
  assign the split by a hash of the input instead (``pairs.hash_split``), so it never depends on order.
- ``generator``, ``generator_version``, ``seed``, ``params`` (``size``, ``val_fraction``), ``total_samples``,
  ``modules``, ``counts`` (per module, per split), ``split_counts``, and ``content_sha256`` = sha256 of
  ``dumps_json({"data": data, "val": splits.val})``.

What the split tests:

- computed problems (arithmetic; square / rectangle / triangle geometry; physics formulas): whole operand tuples are
  held out. Every problem that shows two numbers — arithmetic, rectangles, the physics formulas — is keyed by that
  unordered pair, one key shared by all of those modules and operators: when ``12 + 34`` is in val, no ``34 - 12``,
  ``12 × 34``, 34 × 12 rectangle or 34 N over 12 m of any phrasing is in train. Other keys: square side; the
  triangle's sorted angle triple (so ``30, 60 → 90`` and ``30, 90 → 60`` fall together); the right triangle's
  smaller acute angle; the mass. Val measures computing with numbers never seen together in training.
- facts (zodiac, physics facts, reverse_english, geometry facts): each fact has ≥ 4 phrasings; a seeded subset of a
  fact's phrasings is held out, always leaving ≥ 2 phrasings of that fact in train. Val measures recalling a known
  fact from an unseen question wording.

Same seed and parameters → the same document (byte-identical through ``apt_model.io.dumps_json``); ``size`` scales
only the computed problems. Inputs are unique across the whole dataset (a generator bug that produced one question
with two answers raises).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from apt_model.data.concepts import CONCEPTS
from apt_model.data.pairs import GENERATOR_VERSION, check_params, unit_hash
from apt_model.io import dumps_json, sha256_bytes

_T = TypeVar("_T")

MODULES: tuple[str, ...] = ("geometry", "arithmetic", "zodiac", "physics", "reverse_english")

# Hold-out family of every problem that shows two numbers (arithmetic, rectangles, the physics formulas), keyed by
# the unordered pair shown: one seeded draw per pair, shared across modules, so a held-out 12 × 5 rectangle area is
# not also a training "12 × 5 = ?" or a training distance at 12 m/s for 5 s (generator 1.0.0 drew per module).
OPERANDS = "operands"

# Computed problems per kind and size (capped by how many distinct problems exist).
_ARITH_COUNTS = {
    "small": {"+": 100, "-": 100, "×": 60, "÷": 60},
    "default": {"+": 700, "-": 700, "×": 400, "÷": 400},
    "large": {"+": 2500, "-": 2500, "×": 482, "÷": 482},
    "xl": {"+": 2500, "-": 2500, "×": 482, "÷": 482},
    "xxl": {"+": 2500, "-": 2500, "×": 9801, "÷": 9801},
}
# Operand bound of × and ÷ per size: products within 100 (the reference's arithmetic), except xxl, which has every ×
# and ÷ of two-digit operands (up to 99). Physics' formulas and the rectangle areas multiply and divide numbers up to
# 50, and their unseen products are what the model gets wrong; on an H200 (BENCHMARKS.md, thirteenth and fourteenth
# sessions) physics' val went from 50–53% with xl's data to 59% with operands up to 50, 75% up to 70 and 84% up to
# 99 — and 78% with as many problems drawn from operands up to 120: the density of two-digit problems is what counts.
_WIDE_OPERAND = 99
# Phrasings per wide × and ÷ problem (the first drawn as for every other arithmetic problem, the rest the templates
# after it); 1 in the generator, more only in bench/hlbd_wide.py's explorations.
_WIDE_PHRASINGS = 1
_GEOMETRY_COUNTS = {
    "small": {"square": 40, "rectangle": 60, "triangle": 60, "right": 20},
    "default": {"square": 100, "rectangle": 350, "triangle": 300, "right": 89},
    "large": {"square": 100, "rectangle": 870, "triangle": 2000, "right": 89},
    # xl: the computed kinds that `large` leaves thin, measured per kind on an H200 (BENCHMARKS.md): triangles
    # (2,000 of 15,931 angle pairs gave 16% val exact) and the physics formulas (300 of 380–931 each: 19–56%).
    # Arithmetic stays at `large` (+ and − already ≥ 98% val there).
    "xl": {"square": 100, "rectangle": 870, "triangle": 8000, "right": 89},
}
# Per formula kind, capped by its pool (xl: every problem of every formula).
_PHYSICS_COUNTS = {"small": 20, "default": 80, "large": 300, "xl": 1000}
# xxl is xl with wider × and ÷ (above): everything else is xl's, by construction.
_GEOMETRY_COUNTS["xxl"] = _GEOMETRY_COUNTS["xl"]
_PHYSICS_COUNTS["xxl"] = _PHYSICS_COUNTS["xl"]

# --------------------------------------------------------------------------------------------------- arithmetic
_ARITH_TEMPLATES: dict[str, tuple[str, ...]] = {
    "+": (
        "{a} + {b} = ?",
        "{a}加{b}等于多少？",
        "计算：{a} + {b}",
        "{a}与{b}的和是多少？",
        "{a}加上{b}得几？",
    ),
    "-": (
        "{a} - {b} = ?",
        "{a}减{b}等于多少？",
        "计算：{a} - {b}",
        "{a}与{b}的差是多少？",
        "{a}减去{b}得几？",
    ),
    "×": (
        "{a} × {b} = ?",
        "{a}乘{b}等于多少？",
        "计算：{a} × {b}",
        "{a}与{b}的积是多少？",
        "{a}乘以{b}得几？",
    ),
    "÷": (
        "{a} ÷ {b} = ?",
        "{a}除以{b}等于多少？",
        "计算：{a} ÷ {b}",
        "{a}除以{b}的商是多少？",
        "{a}被{b}除得几？",
    ),
}


def _arith_candidates(op: str, wide: bool = False) -> list[tuple[int, int, int]]:
    """Every (a, b, answer) of ``op`` within 100 (× and ÷ with ``wide``: both operands up to 99), in a fixed order."""
    if op == "+":
        return [(a, b, a + b) for a in range(101) for b in range(101 - a)]
    if op == "-":
        return [(a, b, a - b) for a in range(101) for b in range(a + 1)]
    if wide:
        n = _WIDE_OPERAND
        if op == "×":
            return [(a, b, a * b) for a in range(1, n + 1) for b in range(1, n + 1)]
        return [(b * q, b, q) for b in range(1, n + 1) for q in range(1, n + 1)]
    if op == "×":
        return [(a, b, a * b) for a in range(1, 101) for b in range(1, 100 // a + 1)]
    return [(b * q, b, q) for b in range(1, 101) for q in range(1, 100 // b + 1)]


# ----------------------------------------------------------------------------------------------------- geometry
_SHAPES: tuple[tuple[str, int], ...] = (
    ("三角形", 3),
    ("四边形", 4),
    ("正方形", 4),
    ("长方形", 4),
    ("平行四边形", 4),
    ("梯形", 4),
    ("菱形", 4),
    ("五边形", 5),
    ("六边形", 6),
    ("七边形", 7),
    ("八边形", 8),
    ("九边形", 9),
    ("十边形", 10),
    ("十二边形", 12),
)
_SHAPE_TEMPLATES: dict[str, tuple[tuple[str, ...], Callable[[int], int]]] = {
    "edges": (
        (
            "{s}有几条边？",
            "一个{s}有多少条边？",
            "{s}的边数是多少？",
            "数一数，{s}共有几条边？",
            "{s}由几条边组成？",
        ),
        lambda n: n,
    ),
    "angles": (
        ("{s}有几个角？", "一个{s}有多少个角？", "{s}的角有几个？", "{s}一共有几个内角？"),
        lambda n: n,
    ),
    "vertices": (
        ("{s}有几个顶点？", "一个{s}有多少个顶点？", "{s}的顶点数是多少？", "{s}共有几个顶点？"),
        lambda n: n,
    ),
    "angle_sum": (
        (
            "{s}的内角和是多少度？",
            "一个{s}的内角和是几度？",
            "{s}所有内角加起来是多少度？",
            "求{s}的内角和（单位：度）",
            "{s}内角之和等于多少度？",
        ),
        lambda n: (n - 2) * 180,
    ),
    "diagonals": (
        (
            "{s}有几条对角线？",
            "一个{s}共有多少条对角线？",
            "{s}的对角线条数是多少？",
            "数一数{s}有几条对角线？",
        ),
        lambda n: n * (n - 3) // 2,
    ),
}
_REGULAR: tuple[tuple[str, int], ...] = (
    ("正三角形", 3),
    ("正方形", 4),
    ("正五边形", 5),
    ("正六边形", 6),
    ("正八边形", 8),
    ("正九边形", 9),
    ("正十边形", 10),
    ("正十二边形", 12),
)
_REGULAR_TEMPLATES = {
    "interior": (
        ("{s}的每个内角是多少度？", "{s}一个内角等于几度？", "{s}的内角各是多少度？", "求{s}每个内角的度数"),
        lambda n: (n - 2) * 180 // n,
    ),
    "exterior": (
        ("{s}的每个外角是多少度？", "{s}一个外角等于几度？", "{s}的外角各是多少度？", "求{s}每个外角的度数"),
        lambda n: 360 // n,
    ),
}
_FORMULAS: tuple[tuple[str, str], ...] = (
    ("圆的周长", "C = 2πr"),
    ("圆的面积", "A = πr²"),
    ("正方形的面积", "A = a²"),
    ("正方形的周长", "C = 4a"),
    ("长方形的面积", "A = ab"),
    ("长方形的周长", "C = 2(a + b)"),
    ("三角形的面积", "A = ah/2"),
)
_FORMULA_TEMPLATES = (
    "{q}公式是什么？",
    "{q}怎么算？",
    "写出{q}的公式",
    "{q}用字母怎么表示？",
    "请给出{q}的计算公式",
)
_ANGLE_FACTS: tuple[tuple[str, int], ...] = (("直角", 90), ("平角", 180), ("周角", 360))
_ANGLE_TEMPLATES = ("{x}是多少度？", "一个{x}等于几度？", "{x}的度数是多少？", "{x}有多少度？")

_SQUARE_TEMPLATES = {
    "area": (
        "边长为{a}的正方形面积是多少？",
        "正方形边长{a}，面积是多少？",
        "一个正方形的边长是{a}，求面积",
        "边长{a}的正方形，面积等于？",
        "求边长为{a}的正方形的面积",
    ),
    "perimeter": (
        "边长为{a}的正方形周长是多少？",
        "正方形边长{a}，周长是多少？",
        "一个正方形的边长是{a}，求周长",
        "边长{a}的正方形，周长等于？",
        "求边长为{a}的正方形的周长",
    ),
}
_RECT_TEMPLATES = {
    "area": (
        "长{a}宽{b}的长方形面积是多少？",
        "长方形的长是{a}，宽是{b}，面积是多少？",
        "一个长方形长{a}、宽{b}，求面积",
        "求长为{a}、宽为{b}的长方形的面积",
        "长方形长{a}宽{b}，面积等于？",
    ),
    "perimeter": (
        "长{a}宽{b}的长方形周长是多少？",
        "长方形的长是{a}，宽是{b}，周长是多少？",
        "一个长方形长{a}、宽{b}，求周长",
        "求长为{a}、宽为{b}的长方形的周长",
        "长方形长{a}宽{b}，周长等于？",
    ),
}
_TRIANGLE_TEMPLATES = (
    "三角形的两个角分别是{x}度和{y}度，第三个角是多少度？",
    "一个三角形中两个内角为{x}°和{y}°，求第三个角",
    "三角形内角{x}度、{y}度，另一个角是几度？",
    "已知三角形两角为{x}度和{y}度，第三角是多少度？",
    "三角形有两个角是{x}度和{y}度，剩下的角多少度？",
)
_RIGHT_TEMPLATES = (
    "直角三角形的一个锐角是{x}度，另一个锐角是多少度？",
    "一个直角三角形有一个角是{x}°（不是直角），另一个锐角是几度？",
    "直角三角形中一个锐角为{x}度，求另一个锐角",
    "已知直角三角形一锐角{x}度，另一锐角多少度？",
)

# ------------------------------------------------------------------------------------------------------- zodiac
ZODIAC: tuple[str, ...] = ("鼠", "牛", "虎", "兔", "龙", "蛇", "马", "羊", "猴", "鸡", "狗", "猪")
_CN_NUM = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二")
_ZODIAC_NEXT = (
    "{x}后面是什么生肖？",
    "{x}的下一个生肖是什么？",
    "十二生肖中{x}之后是哪个？",
    "生肖{x}后面紧跟着的是？",
    "按十二生肖顺序，{x}后面是谁？",
)
_ZODIAC_PREV = (
    "{x}前面是什么生肖？",
    "{x}的上一个生肖是什么？",
    "十二生肖中{x}之前是哪个？",
    "生肖{x}前面紧挨着的是？",
    "按十二生肖顺序，{x}前面是谁？",
)
_ZODIAC_NTH = (
    "第{cn}个生肖是什么？",
    "十二生肖中排第{cn}位的是？",
    "十二生肖的第{n}个是哪个动物？",
    "按顺序数，第{cn}个生肖是？",
    "生肖排行第{n}的是谁？",
)
_ZODIAC_POSITION = (
    "{x}是第几个生肖？",
    "{x}在十二生肖中排第几？",
    "生肖{x}排在第几位？",
    "十二生肖里{x}是第几个？",
    "按顺序，{x}是十二生肖的第几位？",
)
_ZODIAC_AFTER_K = (
    "{x}后面第{k}个生肖是什么？",
    "{x}往后数{k}个是什么生肖？",
    "从{x}开始往后数第{k}个生肖是？",
    "{x}之后的第{k}个生肖是哪个？",
    "十二生肖中{x}后的第{k}个是？",
)
_ZODIAC_BEFORE_K = (
    "{x}前面第{k}个生肖是什么？",
    "{x}往前数{k}个是什么生肖？",
    "从{x}开始往前数第{k}个生肖是？",
    "{x}之前的第{k}个生肖是哪个？",
    "十二生肖中{x}前的第{k}个是？",
)
_ZODIAC_SINGLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "last",
        "猪",
        (
            "最后一个生肖是什么？",
            "十二生肖中最后一个是？",
            "十二生肖排在末位的是哪个？",
            "十二生肖的最后一位是谁？",
        ),
    ),
    (
        "first",
        "鼠",
        (
            "排在最前面的生肖是什么？",
            "十二生肖中打头的是哪个？",
            "十二生肖里排第一的是？",
            "生肖之首是哪个动物？",
        ),
    ),
    (
        "count",
        "12",
        ("生肖一共有几个？", "十二生肖共有多少种动物？", "生肖总共有几种？", "一共有多少个生肖？"),
    ),
)

# ------------------------------------------------------------------------------------------------------ physics
_PHYSICS_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "boiling",
        "100",
        (
            "水的沸点是多少摄氏度？",
            "标准大气压下水在多少摄氏度沸腾？",
            "水烧开时的温度是多少度？",
            "一个标准大气压下，水的沸点是几摄氏度？",
            "纯水的沸点是多少℃？",
        ),
    ),
    (
        "freezing",
        "0",
        (
            "水的凝固点是多少摄氏度？",
            "标准大气压下水在多少摄氏度结冰？",
            "水结冰的温度是多少度？",
            "纯水的凝固点是几℃？",
            "冰的熔点是多少摄氏度？",
        ),
    ),
    (
        "gravity",
        "9.8",
        (
            "重力加速度g约为多少m/s²？",
            "地球表面的重力加速度大约是多少米每二次方秒？",
            "g的数值一般取多少m/s²？",
            "物体自由下落的加速度约是多少m/s²？",
        ),
    ),
    (
        "light",
        "300000",
        (
            "光在真空中的速度约是多少km/s？",
            "真空中光速大约是每秒多少千米？",
            "光速约为多少千米每秒？",
            "光每秒在真空中传播约多少km？",
        ),
    ),
    (
        "sound",
        "340",
        (
            "声音在空气中的传播速度约是多少m/s？",
            "常温下空气中声速约为多少米每秒？",
            "声速在空气中大约是多少m/s？",
            "声音在15℃空气中每秒传播约多少米？",
        ),
    ),
    (
        "newton1",
        "惯性定律",
        (
            "牛顿第一定律又叫什么定律？",
            "牛顿第一定律的另一个名称是？",
            "牛顿第一定律也被称为什么？",
            "“一切物体总保持静止或匀速直线运动状态”是什么定律？",
        ),
    ),
    (
        "newton2",
        "F = ma",
        (
            "牛顿第二定律的公式是什么？",
            "写出牛顿第二定律的表达式",
            "牛顿第二定律用字母怎么表示？",
            "力、质量和加速度的关系式是？",
        ),
    ),
    (
        "energy",
        "能量守恒定律",
        (
            "能量既不会凭空产生也不会凭空消失，这是什么定律？",
            "能量只能转化或转移而总量不变，这叫什么定律？",
            "描述能量总量保持不变的定律叫什么？",
            "“能量不会凭空产生或消失”说的是哪个定律？",
        ),
    ),
    (
        "density",
        "ρ = m/V",
        ("密度的公式是什么？", "密度怎么计算？", "写出密度的计算公式", "密度用字母怎么表示？"),
    ),
    (
        "speed",
        "v = s/t",
        ("速度的公式是什么？", "速度怎么计算？", "写出速度的计算公式", "速度用字母怎么表示？"),
    ),
    (
        "pressure",
        "P = F/S",
        ("压强的公式是什么？", "压强怎么计算？", "写出压强的计算公式", "压强用字母怎么表示？"),
    ),
    ("work", "W = Fs", ("功的公式是什么？", "功怎么计算？", "写出功的计算公式", "功用字母怎么表示？")),
    (
        "weight",
        "G = mg",
        ("重力的公式是什么？", "重力怎么计算？", "写出重力的计算公式", "重力用字母怎么表示？"),
    ),
    (
        "ohm",
        "I = U/R",
        (
            "欧姆定律的公式是什么？",
            "写出欧姆定律的表达式",
            "欧姆定律用字母怎么表示？",
            "电流、电压和电阻的关系式是？",
        ),
    ),
    (
        "power",
        "P = W/t",
        ("功率的公式是什么？", "功率怎么计算？", "写出功率的计算公式", "功率用字母怎么表示？"),
    ),
    (
        "water_density",
        "1000",
        (
            "水的密度是多少kg/m³？",
            "纯水的密度约为多少千克每立方米？",
            "水的密度等于多少kg/m³？",
            "常温下水的密度大约是多少kg/m³？",
        ),
    ),
)
_UNITS: tuple[tuple[str, str], ...] = (
    ("力", "牛顿"),
    ("功", "焦耳"),
    ("功率", "瓦特"),
    ("压强", "帕斯卡"),
    ("电流", "安培"),
    ("电压", "伏特"),
    ("电阻", "欧姆"),
    ("频率", "赫兹"),
)
_UNIT_TEMPLATES = (
    "{q}的单位是什么？",
    "{q}的国际单位是？",
    "{q}用什么单位来表示？",
    "国际单位制中{q}的单位叫什么？",
)

_PHYSICS_COMPUTED: dict[str, tuple[str, ...]] = {
    "speed": (
        "一辆车{t}秒行驶了{s}米，它的速度是多少m/s？",
        "物体在{t}s内运动了{s}m，平均速度是多少m/s？",
        "路程{s}米，用时{t}秒，速度是多少米每秒？",
        "已知s = {s}m，t = {t}s，求v（m/s）",
        "小明{t}秒跑了{s}米，他的速度是多少m/s？",
    ),
    "distance": (
        "以{v}m/s的速度运动{t}秒，路程是多少米？",
        "速度{v}m/s，时间{t}s，求路程（m）",
        "一辆车速度为{v}m/s，行驶{t}秒走了多少米？",
        "已知v = {v}m/s，t = {t}s，求s（m）",
    ),
    "density": (
        "质量{m}kg、体积{V}m³的物体密度是多少kg/m³？",
        "已知m = {m}kg，V = {V}m³，求ρ（kg/m³）",
        "一个物体质量为{m}kg，体积为{V}m³，它的密度是多少kg/m³？",
        "物体的质量是{m}kg，体积是{V}m³，密度等于多少kg/m³？",
    ),
    "pressure": (
        "{F}N的压力作用在{S}m²的面积上，压强是多少Pa？",
        "已知F = {F}N，S = {S}m²，求P（Pa）",
        "压力为{F}N，受力面积为{S}m²，压强等于多少Pa？",
        "一个物体对地面的压力是{F}N，接触面积{S}m²，压强是多少Pa？",
    ),
    "work": (
        "用{F}N的力使物体沿力的方向移动{s}m，做功多少J？",
        "已知F = {F}N，s = {s}m，求W（J）",
        "力{F}N，距离{s}m，做的功是多少焦耳？",
        "{F}N的力推动物体前进{s}米，做了多少J的功？",
    ),
    "weight": (
        "质量为{m}kg的物体受到的重力是多少N？（g取10N/kg）",
        "已知m = {m}kg，g = 10N/kg，求G（N）",
        "{m}kg的物体重多少牛？（g = 10N/kg）",
        "一个质量{m}kg的物体，重力是多少N？（g取10N/kg）",
    ),
}

# ---------------------------------------------------------------------------------------------- reverse_english
_EXTRA_ENGLISH: tuple[tuple[str, str], ...] = (
    ("你好", "Hello"),
    ("我爱你", "I love you"),
    ("早上好", "Good morning"),
    ("下午好", "Good afternoon"),
    ("晚上好", "Good evening"),
    ("对不起", "Sorry"),
    ("没关系", "It doesn't matter"),
    ("欢迎", "Welcome"),
    ("请", "Please"),
    ("生日快乐", "Happy birthday"),
    ("新年快乐", "Happy New Year"),
    ("我很好", "I am fine"),
    ("你好吗", "How are you"),
    ("我饿了", "I am hungry"),
    ("多少钱", "How much"),
    ("红色", "Red"),
    ("蓝色", "Blue"),
    ("绿色", "Green"),
    ("黄色", "Yellow"),
    ("黑色", "Black"),
    ("白色", "White"),
    ("一", "One"),
    ("二", "Two"),
    ("三", "Three"),
    ("四", "Four"),
    ("五", "Five"),
    ("六", "Six"),
    ("七", "Seven"),
    ("八", "Eight"),
    ("九", "Nine"),
    ("十", "Ten"),
    ("星期一", "Monday"),
    ("星期二", "Tuesday"),
    ("星期三", "Wednesday"),
    ("星期四", "Thursday"),
    ("星期五", "Friday"),
    ("星期六", "Saturday"),
    ("星期日", "Sunday"),
    ("春天", "Spring"),
    ("夏天", "Summer"),
    ("秋天", "Autumn"),
    ("冬天", "Winter"),
    ("爸爸", "Father"),
    ("妈妈", "Mother"),
    ("哥哥", "Elder brother"),
    ("妹妹", "Younger sister"),
    ("中国", "China"),
    ("世界", "World"),
    ("眼睛", "Eye"),
    ("耳朵", "Ear"),
)
_ENGLISH_TEMPLATES = (
    "{zh}的英文是？",
    "{zh}用英语怎么说？",
    "把“{zh}”翻译成英文",
    "“{zh}”的英文翻译是什么？",
    "{zh}英语怎么讲？",
    "请用英文表达：{zh}",
    "{zh}翻译成英语是什么？",
)


def english_vocabulary() -> list[tuple[str, str]]:
    """Chinese → English pairs of reverse_english: the concept table plus common words and phrases."""
    vocab: dict[str, str] = {}
    for zh, en in [(c.concept, c.english) for c in CONCEPTS] + list(_EXTRA_ENGLISH):
        if vocab.setdefault(zh, en) != en:
            raise RuntimeError(f"reverse_english: {zh!r} has two translations")  # table bug, not user input
    return list(vocab.items())


# ------------------------------------------------------------------------------------------------------ builder
class _Builder:
    """Collects items, deduplicating by input across the whole dataset."""

    def __init__(self, seed: int, val_fraction: float) -> None:
        self.seed = seed
        self.val_fraction = val_fraction
        self.data: dict[str, list[dict[str, str]]] = {m: [] for m in MODULES}
        self.seen: dict[str, str] = {}
        self.val: set[str] = set()

    def add(self, module: str, text: str, answer: object, split: str) -> None:
        answer = str(answer)
        previous = self.seen.get(text)
        if previous is not None:
            if previous != answer:
                raise RuntimeError(f"{module}: {text!r} generated with two answers")  # generator bug
            return  # first occurrence (and its split) wins
        self.seen[text] = answer
        self.data[module].append({"input": text, "output": answer})
        if split == "val":
            self.val.add(text)

    def held_out(self, family: str, key: object) -> str:
        """Split of a computed problem: a seeded hash of its number key, shared by every phrasing."""
        return "val" if unit_hash(self.seed, family, key) < self.val_fraction else "train"

    def fact(
        self, module: str, fact_id: str, templates: Sequence[str], answer: object, **fields: object
    ) -> None:
        """Add every phrasing of one fact; a seeded subset of phrasings goes to val, ≥ 2 stay in train."""
        buckets = [unit_hash(self.seed, module, fact_id, i) for i in range(len(templates))]
        val = {i for i, b in enumerate(buckets) if b < self.val_fraction}
        while len(templates) - len(val) < 2 and val:
            val.discard(max(val, key=lambda i: buckets[i]))
        for i, template in enumerate(templates):
            self.add(module, template.format(**fields), answer, "val" if i in val else "train")


def _sample(rng: random.Random, items: Sequence[_T], k: int) -> list[_T]:
    return rng.sample(list(items), min(k, len(items)))


def _arithmetic(b: _Builder, rng: random.Random, size: str) -> None:
    wide = size == "xxl"
    for op, count in _ARITH_COUNTS[size].items():
        templates = _ARITH_TEMPLATES[op]
        for x, y, answer in _sample(rng, _arith_candidates(op, wide=wide), count):
            first = rng.randrange(len(templates))
            split = b.held_out(OPERANDS, (min(x, y), max(x, y)))
            for k in range(_WIDE_PHRASINGS if wide else 1):
                b.add("arithmetic", templates[(first + k) % len(templates)].format(a=x, b=y), answer, split)


def _geometry(b: _Builder, rng: random.Random, size: str) -> None:
    for shape, n in _SHAPES:
        for qtype, (templates, fn) in _SHAPE_TEMPLATES.items():
            b.fact("geometry", f"{qtype}:{shape}", templates, fn(n), s=shape)
    for shape, n in _REGULAR:
        for qtype, (templates, fn) in _REGULAR_TEMPLATES.items():
            b.fact("geometry", f"{qtype}:{shape}", templates, fn(n), s=shape)
    for q, formula in _FORMULAS:
        b.fact("geometry", f"formula:{q}", _FORMULA_TEMPLATES, formula, q=q)
    for x, degrees in _ANGLE_FACTS:
        b.fact("geometry", f"angle:{x}", _ANGLE_TEMPLATES, degrees, x=x)

    counts = _GEOMETRY_COUNTS[size]
    squares = [(kind, a) for a in range(1, 51) for kind in ("area", "perimeter")]
    for kind, a in _sample(rng, squares, counts["square"]):
        answer = a * a if kind == "area" else 4 * a
        text = rng.choice(_SQUARE_TEMPLATES[kind]).format(a=a)
        b.add("geometry", text, answer, b.held_out("geometry-side", a))
    rects = [(kind, a, w) for a in range(2, 31) for w in range(1, a) for kind in ("area", "perimeter")]
    for kind, a, w in _sample(rng, rects, counts["rectangle"]):
        answer = a * w if kind == "area" else 2 * (a + w)
        text = rng.choice(_RECT_TEMPLATES[kind]).format(a=a, b=w)
        b.add("geometry", text, answer, b.held_out(OPERANDS, (w, a)))
    triangles = [(x, y) for x in range(1, 179) for y in range(1, 180 - x)]
    for x, y in _sample(rng, triangles, counts["triangle"]):
        z = 180 - x - y
        text = rng.choice(_TRIANGLE_TEMPLATES).format(x=x, y=y)
        b.add("geometry", text, z, b.held_out("geometry-triangle", tuple(sorted((x, y, z)))))
    for x in _sample(rng, range(1, 90), counts["right"]):
        text = rng.choice(_RIGHT_TEMPLATES).format(x=x)
        b.add("geometry", text, 90 - x, b.held_out("geometry-right", min(x, 90 - x)))


def _zodiac(b: _Builder) -> None:
    for i, x in enumerate(ZODIAC):
        b.fact("zodiac", f"next:{x}", _ZODIAC_NEXT, ZODIAC[(i + 1) % 12], x=x)
        b.fact("zodiac", f"prev:{x}", _ZODIAC_PREV, ZODIAC[(i - 1) % 12], x=x)
        b.fact("zodiac", f"nth:{i + 1}", _ZODIAC_NTH, x, n=i + 1, cn=_CN_NUM[i + 1])
        b.fact("zodiac", f"position:{x}", _ZODIAC_POSITION, i + 1, x=x)
        for k in range(2, 6):
            b.fact("zodiac", f"after:{x}:{k}", _ZODIAC_AFTER_K, ZODIAC[(i + k) % 12], x=x, k=k)
            b.fact("zodiac", f"before:{x}:{k}", _ZODIAC_BEFORE_K, ZODIAC[(i - k) % 12], x=x, k=k)
    for fact_id, answer, templates in _ZODIAC_SINGLE:
        b.fact("zodiac", fact_id, templates, answer)


def _physics(b: _Builder, rng: random.Random, size: str) -> None:
    for fact_id, answer, templates in _PHYSICS_FACTS:
        b.fact("physics", fact_id, templates, answer)
    for q, unit in _UNITS:
        b.fact("physics", f"unit:{q}", _UNIT_TEMPLATES, unit, q=q)

    n = _PHYSICS_COUNTS[size]
    # (kind, template fields, answer, holdout key); every kind divides or multiplies two small numbers.
    problems: dict[str, list[tuple[dict[str, int], int, tuple[int, ...]]]] = {
        "speed": [({"s": v * t, "t": t}, v, (v * t, t)) for v in range(1, 31) for t in range(2, 31)],
        "distance": [({"v": v, "t": t}, v * t, (v, t)) for v in range(2, 31) for t in range(2, 31)],
        "density": [
            ({"m": r * vol, "V": vol}, r, (r * vol, vol)) for r in range(1, 21) for vol in range(2, 21)
        ],
        "pressure": [({"F": p * s, "S": s}, p, (p * s, s)) for p in range(1, 51) for s in range(2, 11)],
        "work": [({"F": f, "s": s}, f * s, (f, s)) for f in range(2, 51) for s in range(2, 21)],
    }
    for kind, candidates in problems.items():
        for fields, answer, key in _sample(rng, candidates, n):
            text = rng.choice(_PHYSICS_COMPUTED[kind]).format(**fields)
            b.add("physics", text, answer, b.held_out(OPERANDS, tuple(sorted(key))))
    for m in _sample(rng, range(1, 101), n):
        text = rng.choice(_PHYSICS_COMPUTED["weight"]).format(m=m)
        b.add("physics", text, m * 10, b.held_out("physics-mass", m))


def _reverse_english(b: _Builder) -> None:
    for zh, en in english_vocabulary():
        b.fact("reverse_english", f"en:{zh}", _ENGLISH_TEMPLATES, en, zh=zh)


def content_sha256(data: dict[str, Any], val: Iterable[str]) -> str:
    """Hash of the data part and its split, as stored in ``metadata.content_sha256``."""
    return sha256_bytes(dumps_json({"data": data, "val": sorted(val)}).encode("utf-8"))


def generate_hardcore(seed: int = 42, size: str = "default", val_fraction: float = 0.1) -> dict[str, Any]:
    """The HLBD Hardcore document for these parameters (see the module docstring)."""
    check_params(seed, size, val_fraction)
    rng = random.Random(seed)
    b = _Builder(seed, float(val_fraction))
    # Fixed module order: the rng stream each module consumes must not depend on anything else.
    _geometry(b, rng, size)
    _arithmetic(b, rng, size)
    _zodiac(b)
    _physics(b, rng, size)
    _reverse_english(b)

    counts = {
        m: {
            "train": sum(1 for r in rows if r["input"] not in b.val),
            "val": sum(1 for r in rows if r["input"] in b.val),
            "total": len(rows),
        }
        for m, rows in b.data.items()
    }
    val_sorted = sorted(b.val)
    total = sum(len(rows) for rows in b.data.values())
    metadata = {
        "name": "HLBD Hardcore Dataset",
        "version": "1.0",
        "description": "Strict-logic question → answer pairs (geometry, arithmetic, zodiac, physics, "
        "reverse_english); deduplicated by input; seeded train/val split in metadata.splits.",
        "generator": "apt_model.data.hardcore",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "params": {"size": size, "val_fraction": float(val_fraction)},
        "total_samples": total,
        "modules": list(MODULES),
        "counts": counts,
        "split_counts": {"train": total - len(val_sorted), "val": len(val_sorted)},
        "splits": {
            "val": val_sorted,
            "rule": "computed problems: seeded hold-out of whole operand tuples (problems showing two numbers: "
            "the unordered pair, across all modules and operators); facts: seeded hold-out of phrasings, "
            ">= 2 phrasings per fact in train",
        },
        "content_sha256": content_sha256(b.data, val_sorted),
    }
    return {"metadata": metadata, "data": b.data}
