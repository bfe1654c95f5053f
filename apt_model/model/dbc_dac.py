"""DBC-DAC gradient stabilisation (spec: ``shared/spec/apt-model.md``, "DBC-DAC").

Dimension-balanced compression + dimension-accompanying compensation, applied to the *accumulated*
gradients once per optimizer step on a deterministic cadence:

* :meth:`DBCDAC.step` is called between the last ``backward()`` of an optimizer step and
  ``optimizer.step()``, with ``optimizer_step`` = the 1-based number of that optimizer step (the first
  update is step 1). It applies when ``cfg.enabled`` and ``optimizer_step % cfg.every_n_steps == 0``, i.e. on
  steps ``n, 2n, 3n, ...``; on other steps (or when disabled) gradients are left untouched.
* When it applies: a 2-D gradient with ``>= cfg.min_numel`` elements is cleaned of non-finite values and
  then replaced by :func:`stabilize`; every other gradient only gets
  ``nan_to_num(nan=0, posinf=1, neginf=-1)`` (:func:`clean_nonfinite_`).

:func:`stabilize` (``G`` m×n):
1. ``D = rowsum(G)``; where ``|D| < threshold``: ``threshold · sign(D)`` with ``sign(0) = +1``;
2. ``Gn = G / D[:, None]``;
3. ``Gn_r = Q Qᵀ Gn`` with ``Q = orth(Gn Ω)`` (:func:`orthonormal_basis`, CholeskyQR), ``Ω`` an n×r Gaussian from a seeded generator on the
   gradient's device, ``r = max(1, ⌊rank_ratio_proj · min(m, n)⌋)`` — an orthogonal projection, so
   ``‖Gn_r‖_F ≤ ‖Gn‖_F`` and ``rank(Gn_r) = r`` (almost surely);
4. DAC: ``approx = Gn_r``; ``iterations`` times: ``approx += res_scale · lowrank(Gn − approx, r_res)`` with
   ``r_res = max(1, ⌊rank_ratio_res · min(m, n)⌋)`` (the residual is taken against the current
   approximation; with the default ``iterations = 1`` this is exactly ``Gn_r + res_scale · lowrank(R)``);
5. ``G ← D[:, None] · approx`` (non-finite results of the round trip are cleaned again).

The maths runs in float32 (float64 for float64 gradients). Nothing in it reads values back to the host; the
generator state advances on every application, and :meth:`DBCDAC.state_dict` saves it for resumption.
Cost: :attr:`DBCDAC.stats` accumulates the wall time of applications (with ``timing=True`` it
synchronises the device around them so the number is real), and :func:`time_stabilize` times
:func:`stabilize` alone on given shapes (for the benchmarks).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from apt_model.config import DBCDACConfig

__all__ = [
    "DBCDAC",
    "FLAT_CLEAN_MAX_NUMEL",
    "DBCDACStats",
    "clean_nonfinite_",
    "clean_nonfinite_all_",
    "lowrank_project",
    "omega_shapes",
    "orthonormal_basis",
    "rank_for",
    "stabilize",
    "stabilize_batch",
    "time_stabilize",
]


def clean_nonfinite_(grad: Tensor) -> Tensor:
    """In place: NaN → 0, +inf → 1, −inf → −1."""
    return torch.nan_to_num_(grad, nan=0.0, posinf=1.0, neginf=-1.0)


# Gradients at least this large are cleaned in place even on an accelerator: one launch each costs nothing next to
# their size, and keeping them out of the flat buffer bounds its extra memory (a few MiB per dtype, not a model's worth).
FLAT_CLEAN_MAX_NUMEL = 1 << 20


def clean_nonfinite_all_(tensors: Sequence[Tensor], *, flat: bool | None = None) -> None:
    """:func:`clean_nonfinite_` on every tensor of ``tensors``; on an accelerator with a few kernels in all.

    One ``nan_to_num_`` per gradient is ~280 kernel launches for the Playground model, and on a GPU their
    dispatch, not their arithmetic, is what they cost. There the dense tensors of one device and dtype below
    :data:`FLAT_CLEAN_MAX_NUMEL` elements are gathered into one flat buffer, cleaned with one kernel and written
    back with one multi-tensor copy. On the CPU the extra copies would cost more than the dispatch they save, so
    each tensor is cleaned in place. ``flat`` forces one route or the other (``None``: by device). The values
    are the same either way.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        gather = t.device.type != "cpu" if flat is None else flat
        if t.is_sparse:
            clean_nonfinite_(t._values())
        elif not gather or t.numel() >= FLAT_CLEAN_MAX_NUMEL:
            clean_nonfinite_(t)
        else:
            groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        _clean_flat_(group)


def _clean_flat_(group: Sequence[Tensor]) -> None:
    """Clean same-device, same-dtype dense tensors through one flat copy (see :func:`clean_nonfinite_all_`)."""
    if len(group) == 1:
        clean_nonfinite_(group[0])
        return
    flat = clean_nonfinite_(torch.cat([t.reshape(-1) for t in group]))
    parts = flat.split([t.numel() for t in group])
    torch._foreach_copy_(list(group), [part.view(t.shape) for part, t in zip(parts, group, strict=True)])


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What DBC-DAC computes in: float64 stays float64 (exactness checks); everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_for(m: int, n: int, ratio: float) -> int:
    """``max(1, ⌊ratio · min(m, n)⌋)``."""
    return max(1, math.floor(ratio * min(m, n)))


def orthonormal_basis(y: Tensor) -> Tensor:
    """An orthonormal basis ``Q`` of the column span of ``y`` (``[..., m, r]``, batched), ``Q Qᵀ`` its projector.

    Shifted CholeskyQR, then CholeskyQR twice more, with the Gram matrices in float64: a handful of batched
    matmuls, one batched Cholesky and one batched triangular solve per pass. That is far cheaper on a GPU than a
    Householder QR per matrix (cuSOLVER's ``geqrf`` runs ~r dependent small kernels for each matrix), and it never
    reads a value back to the host. The small diagonal shift keeps the Cholesky defined for rank-deficient ``y``
    (an all-zero gradient, an embedding gradient touching few rows); with it ``QᵀQ ⪯ I``, so ``Q Qᵀ`` remains a
    contraction and the projection can never grow a norm.
    """
    r = y.shape[-1]
    q = y.double()
    eye = torch.eye(r, dtype=torch.float64, device=y.device)
    tiny = torch.finfo(torch.float64).tiny
    # The first shift absorbs the conditioning that fp32 data cannot resolve anyway; the next two passes
    # restore orthogonality to float64 round-off.
    for rel_shift in (1e-13, 1e-15, 1e-15):
        gram = q.mT @ q
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        gram = gram + (rel_shift * trace + tiny)[..., None, None] * eye
        chol, _ = torch.linalg.cholesky_ex(gram)  # info is not checked: that would be a host sync
        q = torch.linalg.solve_triangular(chol, q.mT, upper=False).mT
    return q.to(y.dtype)


def lowrank_project(
    x: Tensor, rank: int, generator: torch.Generator | None = None, *, omega: Tensor | None = None
) -> Tensor:
    """Randomized range finder: ``Q Qᵀ x`` with ``Q = orth(x Ω)``, ``Ω`` Gaussian ``[n, rank]``.

    ``x`` is one matrix ``[m, n]`` or a batch ``[k, m, n]`` (one ``Ω`` per matrix, drawn in one call). ``omega``
    passes ``Ω`` already drawn (``x``'s batch shape + ``[n, rank]``) instead of drawing it from ``generator``.
    """
    if x.dim() not in (2, 3):
        raise ValueError(
            f"lowrank_project needs a 2-D tensor (or a batch of them), got shape {tuple(x.shape)}"
        )
    n = x.shape[-1]
    if omega is None:
        omega = torch.randn(*x.shape[:-2], n, rank, generator=generator, device=x.device, dtype=x.dtype)
    q = orthonormal_basis(x @ omega)
    return q @ (q.mT @ x)


def stabilize(g: Tensor, cfg: DBCDACConfig, generator: torch.Generator | None = None) -> Tensor:
    """DBC-DAC of one finite 2-D gradient ``g`` (not modified); returns a new tensor of ``g``'s dtype."""
    if g.dim() != 2:
        raise ValueError(f"stabilize needs a 2-D gradient, got shape {tuple(g.shape)}")
    return stabilize_batch(g.unsqueeze(0), cfg, generator)[0]


def omega_shapes(k: int, m: int, n: int, cfg: DBCDACConfig) -> list[tuple[int, int, int]]:
    """The shapes of the Gaussian test matrices :func:`stabilize_batch` draws for ``[k, m, n]``, in drawing order."""
    r_res = rank_for(m, n, cfg.rank_ratio_res)
    return [(k, n, rank_for(m, n, cfg.rank_ratio_proj))] + [(k, n, r_res)] * cfg.iterations


def stabilize_batch(
    g: Tensor,
    cfg: DBCDACConfig,
    generator: torch.Generator | None = None,
    *,
    omegas: Sequence[Tensor] | None = None,
) -> Tensor:
    """DBC-DAC of ``k`` same-shape gradients ``g`` ``[k, m, n]`` at once (``g`` is not modified).

    Batching the matrices of one shape (every layer's ``in_proj``, every ``ff1`` …) turns ~90 small
    factorizations per application into a few batched ones, which is what keeps DBC-DAC's cost on a GPU to a
    small share of the step. ``omegas`` passes the test matrices already drawn (shapes :func:`omega_shapes`,
    float32 — float64 for a float64 ``g``); drawn from ``generator`` in that order they give the same result.
    """
    if g.dim() != 3:
        raise ValueError(f"stabilize_batch needs [k, m, n] gradients, got shape {tuple(g.shape)}")
    _, m, n = g.shape
    x = g.to(_work_dtype(g.dtype))
    d = x.sum(dim=-1)
    sign = torch.where(d >= 0, 1.0, -1.0)
    d = torch.where(d.abs() < cfg.threshold, cfg.threshold * sign, d)
    gn = x / d[..., None]
    if omegas is not None and len(omegas) != 1 + cfg.iterations:
        raise ValueError(f"stabilize_batch needs {1 + cfg.iterations} test matrices, got {len(omegas)}")
    drawn: Iterator[Tensor | None] = iter(omegas) if omegas is not None else itertools.repeat(None)
    approx = lowrank_project(gn, rank_for(m, n, cfg.rank_ratio_proj), generator, omega=next(drawn))
    r_res = rank_for(m, n, cfg.rank_ratio_res)
    for _ in range(cfg.iterations):
        residual = lowrank_project(gn - approx, r_res, generator, omega=next(drawn))
        approx = approx + cfg.res_scale * residual
    out = d[..., None] * approx
    return clean_nonfinite_(out).to(g.dtype)


@dataclass
class DBCDACStats:
    """Running totals: optimizer steps it applied on, gradients stabilised / only cleaned, seconds spent."""

    applied_steps: int = 0
    stabilized: int = 0
    cleaned: int = 0
    seconds: float = 0.0


@dataclass
class _Plan:
    """One application's work: every gradient to clean, and the same-shape groups of targets to stabilise."""

    grads: list[Tensor]
    groups: list[list[Tensor]]  # in first-appearance order (deterministic)
    cleaned: int  # gradients only cleaned

    @classmethod
    def of(cls, params: Sequence[Tensor], is_target: Callable[[Tensor], bool]) -> _Plan:
        grads: list[Tensor] = []
        groups: dict[tuple[torch.Size, torch.dtype, torch.device], list[Tensor]] = {}
        cleaned = 0
        for p in params:
            grad = p.grad
            assert grad is not None
            grads.append(grad)
            if not grad.is_sparse and is_target(p):
                groups.setdefault((grad.shape, grad.dtype, grad.device), []).append(grad)
            else:
                cleaned += 1
        return cls(grads, list(groups.values()), cleaned)

    @property
    def graphable(self) -> bool:
        return bool(self.grads) and all(
            g.is_cuda and not g.is_sparse and g.device == self.grads[0].device for g in self.grads
        )

    def key(self) -> tuple[Any, ...]:
        """Storage, layout and role of every gradient (graphable plans only): what a captured graph recorded."""
        targets = {id(g) for group in self.groups for g in group}
        return tuple(
            (g.data_ptr(), tuple(g.shape), g.stride(), g.dtype, id(g) in targets) for g in self.grads
        )

    def apply_(
        self,
        cfg: DBCDACConfig,
        *,
        generator_for: Callable[[torch.device], torch.Generator] | None = None,
        omegas: Sequence[Sequence[Tensor]] | None = None,
    ) -> None:
        """Clean every gradient, then stabilise each group in place; test matrices drawn from
        ``generator_for(device)``, or ``omegas`` (one list per group) already drawn."""
        clean_nonfinite_all_(self.grads)
        for i, group in enumerate(self.groups):
            generator = generator_for(group[0].device) if generator_for is not None else None
            out = stabilize_batch(
                torch.stack(group), cfg, generator, omegas=omegas[i] if omegas is not None else None
            )
            torch._foreach_copy_(group, list(out.unbind(0)))


class _CapturedApplication:
    """One DBC-DAC application recorded as a CUDA graph over fixed gradient buffers and fixed test matrices.

    An application issues ~560 small kernels whose host-side dispatch, not their GPU time, is what it costs
    (``bench/dbc_dac.py``); a graph replay issues them at once.
    """

    def __init__(self, plan: _Plan, cfg: DBCDACConfig) -> None:
        self.key = plan.key()
        self.cfg = cfg
        self.plan = plan
        self.omegas: list[list[Tensor]] = []
        for group in plan.groups:
            g = group[0]
            shapes = omega_shapes(len(group), g.shape[0], g.shape[1], cfg)
            self.omegas.append([torch.empty(s, dtype=_work_dtype(g.dtype), device=g.device) for s in shapes])
        self.graph: torch.cuda.CUDAGraph | None = None

    def draw(self, generator: torch.Generator) -> None:
        for buffers in self.omegas:
            for buf in buffers:
                torch.randn(buf.shape, generator=generator, out=buf)

    def run(self) -> None:
        self.plan.apply_(self.cfg, omegas=self.omegas)

    def capture(self) -> bool:
        """Record :meth:`run`; False (and no graph) where the device's linear-algebra kernels refuse capture."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # recorded, not executed: the gradients are not touched here
                self.run()
        except RuntimeError as exc:
            warnings.warn(f"DBC-DAC runs eagerly: its CUDA graph could not be captured ({exc})", stacklevel=3)
            return False
        self.graph = graph
        return True

    def replay(self) -> None:
        assert self.graph is not None
        self.graph.replay()


class DBCDAC:
    """Applies DBC-DAC to accumulated gradients on a deterministic optimizer-step cadence.

    ``seed`` seeds one ``torch.Generator`` per device (created on first use on that device). With
    ``cuda_graph=True`` applications after the first replay a CUDA graph of it (same numbers; see ``__init__``).
    """

    def __init__(
        self, cfg: DBCDACConfig, *, seed: int = 0, timing: bool = False, cuda_graph: bool = False
    ) -> None:
        self.cfg = cfg
        self.seed = int(seed)
        self.timing = timing
        # Replay each application from a CUDA graph when the gradients are dense CUDA tensors that keep their
        # storage between applications (the fast path's persistent gradient buffers); otherwise run eagerly.
        self.cuda_graph = cuda_graph
        self._captured: _CapturedApplication | None = None
        self.stats = DBCDACStats()
        self._generators: dict[str, torch.Generator] = {}
        self._pending_states: dict[str, Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if key in self._pending_states:
                gen.set_state(self._pending_states.pop(key))
            self._generators[key] = gen
        return gen

    def should_apply(self, optimizer_step: int) -> bool:
        """True on optimizer steps ``every_n_steps, 2·every_n_steps, ...`` (1-based) when enabled."""
        return self.cfg.enabled and optimizer_step >= 1 and optimizer_step % self.cfg.every_n_steps == 0

    def is_target(self, p: Tensor) -> bool:
        """Whether ``p``'s gradient gets the low-rank stabilisation (rather than only cleaning)."""
        return p.dim() == 2 and p.numel() >= self.cfg.min_numel

    @torch.no_grad()
    def step(self, parameters: Iterable[Tensor], optimizer_step: int) -> bool:
        """Stabilise the gradients of ``parameters`` if ``optimizer_step`` is on the cadence; returns whether it did."""
        if not self.should_apply(optimizer_step):
            return False
        params = [p for p in parameters if p.grad is not None]
        sync = self.timing and any(p.grad.is_cuda for p in params)  # type: ignore[union-attr]
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        plan = _Plan.of(params, self.is_target)
        if self.cuda_graph and plan.graphable:
            self._apply_graphed(plan)
        else:
            plan.apply_(self.cfg, generator_for=self.generator)
        self.stats.cleaned += plan.cleaned
        self.stats.stabilized += sum(len(group) for group in plan.groups)
        if sync:
            torch.cuda.synchronize()
        self.stats.seconds += time.perf_counter() - t0
        self.stats.applied_steps += 1
        return True

    def _apply_graphed(self, plan: _Plan) -> None:
        # The test matrices are drawn outside the graph, from the same generator in the same order as the eager
        # path draws them, so both paths compute the same numbers and the generator state (saved for resumption)
        # advances identically.
        captured = self._captured
        if captured is not None and captured.key == plan.key():
            captured.draw(self.generator(plan.grads[0].device))
            captured.replay()
            return
        captured = _CapturedApplication(plan, self.cfg)
        captured.draw(self.generator(plan.grads[0].device))
        captured.run()  # the real application, eagerly; it also initialises cuBLAS/cuSOLVER before capture
        if captured.capture():
            self._captured = captured
        else:
            self.cuda_graph = False  # the application above already ran; later ones run eagerly

    def summary(self) -> dict[str, Any]:
        """What the run report records about DBC-DAC: its cadence and running totals."""
        st = self.stats
        return {
            "applied_steps": st.applied_steps,
            "stabilized": st.stabilized,
            "cleaned": st.cleaned,
            "seconds": st.seconds,
            "every_n_steps": self.cfg.every_n_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator states and counters (tensors and primitives only: safe for ``weights_only`` loading)."""
        states = dict(self._pending_states)
        states.update({k: g.get_state() for k, g in self._generators.items()})
        return {
            "seed": self.seed,
            "generator_states": states,
            "stats": {
                "applied_steps": self.stats.applied_steps,
                "stabilized": self.stats.stabilized,
                "cleaned": self.stats.cleaned,
                "seconds": self.stats.seconds,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators.clear()
        self._pending_states = {str(k): v for k, v in state.get("generator_states", {}).items()}
        self.stats = DBCDACStats(**state.get("stats", {}))


def time_stabilize(
    shapes: Sequence[tuple[int, int]],
    cfg: DBCDACConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Wall time of one DBC-DAC application to random gradients of ``shapes`` (device-synchronised).

    The gradients go through :meth:`DBCDAC.step` (same-shape batching included), as in training. Returns ``{"per_application_s": median seconds to stabilise all shapes once, "all_s": [...], ...}``.
    """
    cfg = cfg or DBCDACConfig()
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(*s, device=device, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(*p.shape, generator=gen, device=device, dtype=dtype)
    dbc = DBCDAC(dataclasses.replace(cfg, enabled=True, every_n_steps=1, min_numel=1), seed=seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: list[float] = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        dbc.step(params, optimizer_step=1)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ordered = sorted(times)
    return {
        "per_application_s": ordered[len(ordered) // 2],
        "all_s": times,
        "shapes": [list(s) for s in shapes],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
