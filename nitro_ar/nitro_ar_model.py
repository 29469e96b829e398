"""Nitro-AR: masked autoregressive generation with continuous tokens (eager reference).

Random numbers of :meth:`NitroAR.generate` are drawn in this fixed order, on the generator's
device (CPU generator: the same numbers on every device), in float32, then cast:

- ``gan``: one ``torch.randperm(L)`` per image (the generation order, images in batch order);
  then, per AR step, ``randn(rows, C)`` for the tokens predicted at that step (rows ordered by
  image, then by position).
- ``joint_gan``: ``randn(B, 1, C)`` for the global token; one ``randperm(L)`` per image; then,
  per AR step, ``randn(B, L, C)``.
- With a refinement window k > 1 (``generate(window=k)``, :mod:`nitro_ar.tensorar`), a step's
  rows are its new tokens and the re-predicted ones of the k - 1 steps before it, all drawn
  fresh in the same row order; the flush passes after the last AR step draw theirs next, one
  pass after the other. k = 1 draws exactly the numbers above.

All of them are drawn before the first backbone call. The AR loop itself never reads a device
value on the host: what depends only on the step (mask lengths, rows predicted per image, head
step counts, guidance weights) is a host-side :class:`SamplingPlan`, and each step's tokens are
gathered and scattered through index tensors built once from the orders on the device.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .checkpoint import PretrainedMixin
from .config import NitroARConfig
from .errors import invalid
from .heads import FlowHead, MLPHead, TransformerHead, head_steps_schedule
from .layers import RMSNorm
from .mmdit import EMMDiTTrunk, GELUTanh, compress_tokens, reconstruct_tokens, shuffle_body
from .schedules import FlowSchedule, ShortcutSchedule, cfg_for_step, mar_mask_len, shortcut_schedule, step_head_counts
from .utils import check_tensor

__all__ = ["NitroAR", "SamplingPlan", "ARStepPlan", "EagerSession", "masked_before_steps"]


@dataclass(frozen=True)
class ARStepPlan:
    """Host numbers of one AR step: they depend on the step and the options, never on data.

    In every image the step predicts the positions ``orders[b, lo:hi]``, taken in ascending
    order (the official row order: image, then position), ``rows = hi - lo`` tokens per image.
    Its starting noise is rows ``noise_offset : noise_offset + noise_rows`` of the plan's noise.
    """

    index: int
    mask_len: int  # tokens left masked after this step
    lo: int
    hi: int
    head_steps: int
    cfg: float  # guidance weight of this step
    noise_offset: int
    noise_rows: int
    reset: bool = False  # joint_gan, first step: positions not predicted return to the mask token
    # Refinement window: the step's new tokens are orders[b, new_lo:new_hi] (a sub-range of
    # lo:hi); the rest of lo:hi is re-predicted. Flush passes have new_lo == new_hi.
    new_lo: int = 0
    new_hi: int = 0

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    @property
    def runs(self) -> bool:
        """False for a step that predicts nothing and changes nothing (more AR steps than tokens)."""
        return self.rows > 0 or self.reset


@dataclass(frozen=True)
class SamplingPlan:
    """Everything :meth:`NitroAR.generate` decides on the host before its loop (hashable: the
    key of captured graphs). ``global_head_steps`` is 0 for ``gan``."""

    batch: int
    seq: int
    chans: int
    joint: bool
    guided: bool
    steps: Tuple[ARStepPlan, ...]
    global_head_steps: int = 0
    global_cfg: float = 1.0
    window: int = 1  # refinement window k (1: plain masked AR)
    age_rows: int = 0  # rows of the model's age embedding fed to the backbone (0: none)
    head_sampler: str = "official"  # or "shortcut" (FAR: uniform steps, the heads' step embedding)

    def schedule(self, buffers: Dict[str, torch.Tensor], count: int, head: str = "head") -> FlowSchedule:
        """The schedule of ``count`` steps of ``head`` ("head" or "global_head") from the session's
        device buffers, with the head's time embedding when the session holds one."""
        fields = dict(timesteps=buffers[f"timesteps{count}"], sigmas=buffers[f"sigmas{count}"],
                      time_embedding=buffers.get(f"{head}_time_embedding{count}"))
        if self.head_sampler == "shortcut":
            return ShortcutSchedule(**fields, step_size=buffers[f"step_size{count}"])
        return FlowSchedule(**fields)

    @property
    def noise_rows(self) -> int:
        return sum(step.noise_rows for step in self.steps)

    @property
    def head_counts(self) -> Tuple[int, ...]:
        """Distinct head step counts (one device schedule each)."""
        counts = {step.head_steps for step in self.steps if step.runs}
        return tuple(sorted(counts | ({self.global_head_steps} if self.joint else set())))

    def positions(self, orders: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Per step, the (B, rows) int64 positions it predicts, ascending within each image.

        orders: (B, L) generation orders. Built on orders' device; nothing is read on the host.
        """
        return tuple(orders[:, step.lo : step.hi].sort(dim=1).values for step in self.steps)

    def generation_steps(self, orders: torch.Tensor) -> torch.Tensor:
        """(B, L) int64: the AR step at which each position is first generated (device ops only)."""
        made = torch.zeros_like(orders)
        for step in self.steps:
            if step.new_hi > step.new_lo:
                made = made.scatter(1, orders[:, step.new_lo : step.new_hi], step.index)
        return made

    def age_indices(self, step: ARStepPlan, made: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 rows of the age embedding at ``step`` (``age_rows``: no embedding).

        A visible token first generated at step g has age ``a = step - 1 - g``; it gets row a
        when ``a <= min(window, age_rows + 1) - 2`` (it is re-predicted at this step).
        """
        age = step.index - 1 - made
        limit = min(self.window, self.age_rows + 1) - 2
        return torch.where((age >= 0) & (age <= limit), age, torch.full_like(age, self.age_rows))


class EagerSession:
    """Runs the phases of a sampling plan as they come: ``buffers[out] = fn(buffers)``.

    The interface the graph runner (:mod:`nitro_ar.fast.graphs`) replays captured phases
    through: a phase reads only ``buffers`` (and the model's parameters) and returns tensors.
    """

    def __init__(self, buffers: Dict[str, torch.Tensor]):
        self.buffers = dict(buffers)

    def phase(self, fn: Callable[[Dict[str, torch.Tensor]], object], out: Union[str, Sequence[str]], *,
              fresh: bool = False):
        """Run ``fn(buffers)`` and store its result(s) under ``out``; returns them."""
        result = fn(self.buffers)
        if isinstance(out, str):
            self.buffers[out] = result
        else:
            self.buffers.update(zip(out, result))
        return result


def integer_argument(name: str, value, minimum: int) -> int:
    """``value`` as an int, or InvalidArgumentError (bools and non-integral numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise invalid(name, value, f"an integer >= {minimum}")
    return int(value)


def finite_number(name: str, value) -> float:
    """``value`` as a float, or InvalidArgumentError (bools, NaN and infinities refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise invalid(name, value, "a finite number")
    return float(value)


def masked_before_steps(ar_steps: int, seq: int) -> Tuple[int, ...]:
    """``(K + 1,)`` host ints: tokens still masked before AR step t = 0 .. K (``seq`` first,
    0 last), so order positions ``bounds[t+1]:bounds[t]`` are the tokens step t generates."""
    bounds, still_masked = [seq], seq
    for index in range(ar_steps):
        still_masked = 0 if index == ar_steps - 1 else mar_mask_len(index, ar_steps, seq, still_masked)
        bounds.append(still_masked)
    return tuple(bounds)


CFG_SCHEDULES = ("constant", "linear")
HEAD_STEP_SCHEDULES = ("constant", "linear", "cosine", "two-stage")
HEAD_SAMPLERS = ("official", "shortcut")


class _ShuffleBlock(nn.Module):
    """Official ``Downsample`` / ``Upsample``: keys ``body.1``, ``body.3``."""

    def __init__(self, dim: int, ratio: int, down: bool):
        super().__init__()
        self.body = shuffle_body(dim, ratio, down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NitroAR(EMMDiTTrunk, PretrainedMixin):
    """Nitro-AR: E-MMDiT backbone (no timestep) + flow-matching head(s).

    Parameter names are the official checkpoint's (``block_groups.*``, ``downsamplers.*``,
    ``diffloss.net.*``, ...). See :class:`nitro_ar.NitroARConfig` for the variants.
    """

    config_class = NitroARConfig

    def __init__(self, config: NitroARConfig):
        super().__init__()
        self.config = config
        dim, joint = config.inner_dim, config.variant == "joint_gan"
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.in_channels))
        self.context_embedder = nn.Linear(config.caption_channels, dim)
        self.x_proj = nn.Linear(config.in_channels, dim)
        self.z_proj_ln = RMSNorm(dim) if joint else nn.LayerNorm(dim, eps=1e-6)
        self.block_groups = self.build_block_groups(config, norm_type=config.norm_type, adaln_affine=False)
        self.downsamplers = nn.ModuleList([nn.ModuleList([_ShuffleBlock(dim, 2, True), _ShuffleBlock(dim, 4, True)])])
        self.upsamplers = nn.ModuleList([nn.ModuleList([_ShuffleBlock(dim, 2, False), _ShuffleBlock(dim, 4, False)])])
        self.mergers = nn.ModuleList([nn.Sequential(nn.Linear(3 * dim, dim), GELUTanh(), nn.Linear(dim, dim))])
        self.diffloss = FlowHead(self._make_head())
        if config.refine_window > 1:  # TensorAR-style refinement: zero rows = the official model
            self.age_embed = nn.Embedding(config.refine_window - 1, dim)
            nn.init.zeros_(self.age_embed.weight)
        if joint:
            self.global_z_proj = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if config.global_head:
                self.diffloss_global = FlowHead(self._make_head())
        self.register_buffer("pos_embed_lv0", config.position_table(), persistent=False)

    # ------------------------------------------------------------------ construction helpers
    def _make_head(self) -> nn.Module:
        cfg = self.config
        if cfg.variant == "gan":
            return MLPHead(cfg.out_channels, cfg.diffloss_w, cfg.diffloss_d, cfg.inner_dim, shortcut=cfg.shortcut)
        return TransformerHead(cfg.out_channels, cfg.diffloss_w, cfg.diffloss_d, cfg.inner_dim, grid=cfg.grid_size,
                               shortcut=cfg.shortcut)

    @property
    def seq_len(self) -> int:
        return self.config.num_tokens

    @property
    def is_joint(self) -> bool:
        return self.config.variant == "joint_gan"

    # ------------------------------------------------------------------ backbone
    def compress(self, h: torch.Tensor) -> torch.Tensor:
        down2, down4 = self.downsamplers[0]
        return compress_tokens(h, down2, down4, self.config.grid_size)

    def reconstruct(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up2, up4 = self.upsamplers[0]
        return reconstruct_tokens(h, skip, up2, up4, self.mergers[0], self.config.grid_size)

    def _check_text(self, text: torch.Tensor) -> None:
        check_tensor("text", text, 3, self.config.caption_channels)

    def backbone(self, tokens: torch.Tensor, text: torch.Tensor, ages: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Backbone conditions for every token.

        Args:
            tokens: (B, L, C) latent tokens (masked positions hold ``mask_token``), L = grid^2.
            text: (B, Lt, C_text) text-encoder hidden states.
            ages: optional (B, L) int64 rows of ``age_embed`` added after ``x_proj`` (refinement
                window, :mod:`nitro_ar.tensorar`); the value ``age_embed.num_embeddings`` adds
                nothing. Ignored by a model without ``age_embed``.
        Returns:
            (B, L, D) hidden states (D = heads * head_dim) that condition the head.
        """
        check_tensor("tokens", tokens, 3, self.config.in_channels)
        self._check_text(text)
        if tokens.shape[1] != self.seq_len or tokens.shape[0] != text.shape[0]:
            raise ValueError(f"tokens {tuple(tokens.shape)} and text {tuple(text.shape)}: "
                             f"expected (B, {self.seq_len}, C) and (B, Lt, C_text)")
        h = self.x_proj(tokens)
        if ages is not None and hasattr(self, "age_embed"):
            table = nn.functional.pad(self.age_embed.weight, (0, 0, 0, 1))  # last row: no age
            h = h + nn.functional.embedding(ages, table).to(h.dtype)
        h = self.z_proj_ln(h + self.pos_embed_lv0)
        return self.run_trunk(h, self.context_embedder(text), None, self.pos_embed_lv0)

    def global_backbone(self, text: torch.Tensor) -> torch.Tensor:
        """joint_gan: condition of the global token: (B, Lt, C_text) -> (B, 1, D).

        Input is ``mask_token`` per image (no position table), only block group 0 runs, then
        ``global_z_proj``.
        """
        self._require_joint("global_backbone")
        self._check_text(text)
        tokens = self.mask_token.repeat(text.shape[0], 1, 1)
        h = self.z_proj_ln(self.x_proj(tokens))
        h, _ = self.run_group(0, h, self.context_embedder(text), None)
        return self.global_z_proj(h)

    # ------------------------------------------------------------------ heads
    def _require_joint(self, what: str) -> None:
        if not self.is_joint:
            raise ValueError(f"{what} exists only in the joint_gan variant (this model is {self.config.variant!r})")

    @property
    def global_net(self) -> nn.Module:
        """The head that samples the global token (``diffloss_global``, else ``diffloss``)."""
        self._require_joint("the global head")
        holder = getattr(self, "diffloss_global", None)
        return (self.diffloss if holder is None else holder).net

    def head(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Velocity prediction of the head.

        MLP head (gan): x (N, C), t (N,), c (N, D) -> (N, C). Transformer head (joint_gan):
        x (B, L, C), t (B,), c (B, L, D) -> (B, L, C). t is the raw timestep in (0, 1000].
        """
        return self.diffloss.net(x, t, c)

    def global_head(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """joint_gan global-token head: x (B, 1, C), t (B,), c (B, 1, D) -> (B, 1, C)."""
        return self.global_net(x, t, c)

    def head_schedule(self, num_steps: int, sampler: str = "official"):
        """The Euler schedule of this model's head for ``num_steps`` steps: the official one, or
        (``sampler="shortcut"``) FAR's uniform steps with step size d = 1/N (:func:`shortcut_schedule`)."""
        if sampler == "shortcut":
            return shortcut_schedule(num_steps, num_train_timesteps=self.config.num_sampling_steps)
        return head_steps_schedule(num_steps, self.is_joint, self.config.num_sampling_steps, self.config.shift)

    def head_sample(self, z: torch.Tensor, *, num_steps: int, cfg: float = 1.0, noise: torch.Tensor) -> torch.Tensor:
        """The official head sampling loop with explicit starting noise.

        Args:
            z: conditions, (N, D) (gan) or (B, L, D) (joint_gan); [uncond; cond] when cfg != 1.
            noise: (N, C) or (B, L, C) starting latents (half of z's rows when cfg != 1).
        Returns:
            Sampled tokens shaped like ``noise``, in z's dtype.
        """
        return self.diffloss.net.sample(z, noise, self.head_schedule(num_steps), cfg)

    def global_head_sample(self, z: torch.Tensor, *, num_steps: int, cfg: float = 1.0, noise: torch.Tensor) -> torch.Tensor:
        """joint_gan: sample the global token. z (B or 2B, 1, D), noise (B, 1, C) -> (B, 1, C)."""
        return self.global_net.sample(z, noise, self.head_schedule(num_steps), cfg)

    # ------------------------------------------------------------------ sampling
    # Where the phases of generate run: None (eager), or a graph runner set by nitro_ar.fast.
    sampling_runner = None

    def _draw_orders(self, batch: int, generator, device) -> torch.Tensor:
        return torch.stack([torch.randperm(self.seq_len, generator=generator, device=device) for _ in range(batch)])

    def sampling_plan(
        self,
        batch: int,
        *,
        ar_steps: Optional[int] = None,
        head_steps: Union[int, Sequence[int], None] = None,
        cfg: Optional[float] = None,
        cfg_schedule: str = "constant",
        head_steps_schedule: str = "constant",
        head_steps_end: Optional[int] = None,
        refine: bool = False,
        global_token_dependency: bool = False,
        window: Optional[int] = None,
        flush_window: bool = True,
        head_sampler: str = "official",
    ) -> SamplingPlan:
        """The host-side plan of :meth:`generate` (arguments as there; validated, named errors)."""
        conf = self.config
        batch = integer_argument("batch", batch, 1)
        ar_steps = conf.ar_steps if ar_steps is None else integer_argument("ar_steps", ar_steps, 1)
        window = conf.refine_window if window is None else integer_argument("window", window, 1)
        if window > 1 and refine:
            raise invalid("refine", refine, "False with window > 1 (refine re-predicts every token: window = all)")
        if window > 1 and ar_steps < 2 and self.is_joint:
            raise invalid("ar_steps", ar_steps, "at least 2 for joint_gan with window > 1 (one AR step has no earlier "
                          "tokens to refine)")
        head_steps = conf.head_steps if head_steps is None else head_steps
        guidance = finite_number("cfg", conf.cfg if cfg is None else cfg)
        if cfg_schedule not in CFG_SCHEDULES:
            raise invalid("cfg_schedule", cfg_schedule, " or ".join(map(repr, CFG_SCHEDULES)))
        if head_steps_schedule not in HEAD_STEP_SCHEDULES:
            raise invalid("head_steps_schedule", head_steps_schedule, ", ".join(map(repr, HEAD_STEP_SCHEDULES)))
        if head_sampler not in HEAD_SAMPLERS:
            raise invalid("head_sampler", head_sampler, " or ".join(map(repr, HEAD_SAMPLERS)))
        counts = step_head_counts(ar_steps, head_steps, head_steps_schedule, head_steps_end)
        seq, joint = self.seq_len, self.is_joint
        bounds = masked_before_steps(ar_steps, seq)

        def bound(t: int) -> int:
            return bounds[min(max(t, 0), ar_steps)]

        passes = ar_steps + (window - 1 if flush_window else 0)
        steps, still_masked, offset = [], seq, 0
        for index in range(passes):
            real = index < ar_steps
            mask_len = mar_mask_len(index, ar_steps, seq, still_masked) if real else 0
            last = index == ar_steps - 1
            if refine:  # every token not masked any more is (re-)predicted
                lo, hi = (0, seq) if last else (mask_len, seq)
            else:  # the tokens unmasked by this step and those of the window - 1 steps before
                lo, hi = bound(index + 1), bound(index - window + 1)
            new_lo, new_hi = (lo, hi) if refine else (bound(index + 1), bound(index))
            noise_rows = batch * (seq if joint else hi - lo)
            source = min(index, ar_steps - 1)  # flush passes: the last AR step's head steps and guidance
            weight = cfg_for_step(guidance, cfg_schedule, seq, mask_len if real else steps[source].mask_len)
            steps.append(ARStepPlan(index, mask_len, lo, hi, counts[source], weight, offset, noise_rows,
                                    reset=joint and index == 0 and not global_token_dependency,
                                    new_lo=new_lo, new_hi=new_hi))
            still_masked, offset = mask_len, offset + noise_rows
        age_rows = self.age_embed.num_embeddings if window > 1 and hasattr(self, "age_embed") else 0
        return SamplingPlan(batch, seq, self.config.in_channels, joint, guidance != 1.0, tuple(steps),
                            global_head_steps=counts[0] if joint else 0, global_cfg=guidance,
                            window=window, age_rows=age_rows, head_sampler=head_sampler)

    def _draw(self, plan: SamplingPlan, generator, gen_device) -> Dict[str, torch.Tensor]:
        """Every random number of one generate call, in the documented order, on the model's device."""
        device, dtype = self.device, self.dtype

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device=gen_device)

        drawn = {}
        if plan.joint:
            drawn["global_noise"] = randn(plan.batch, 1, plan.chans).to(device=device, dtype=dtype)
        drawn["orders"] = self._draw_orders(plan.batch, generator, gen_device).to(device)
        shapes = [(plan.batch, plan.seq, plan.chans) if plan.joint else (step.noise_rows, plan.chans) for step in plan.steps]
        drawn["noise"] = torch.cat([randn(*shape).reshape(-1, plan.chans) for shape in shapes]).to(device=device, dtype=dtype)
        return drawn

    def _mask_tokens(self, plan: SamplingPlan) -> torch.Tensor:
        return self.mask_token.to(self.dtype).expand(plan.batch, plan.seq, plan.chans)

    def _global_phase(self, plan: SamplingPlan):
        """joint_gan: the global token's backbone pass and head loop -> (B, L, C) starting tokens."""

        def run(b: Dict[str, torch.Tensor]) -> torch.Tensor:
            schedule = plan.schedule(b, plan.global_head_steps, "global_head")
            token = self.global_net.sample(self.global_backbone(b["text"]), b["global_noise"], schedule, plan.global_cfg)
            return token.expand(plan.batch, plan.seq, plan.chans)

        return run

    def _step_phase(self, plan: SamplingPlan, step: ARStepPlan, source: str):
        """One AR step: backbone on [uncond; cond], the head's sampling loop with CFG, the token
        scatter. Reads ``buffers[source]`` (tokens), returns the new (B, L, C) tokens."""
        batch, seq, chans = plan.batch, plan.seq, plan.chans

        def run(b: Dict[str, torch.Tensor]) -> torch.Tensor:
            tokens = b[source]
            ages = plan.age_indices(step, b["made"]) if plan.age_rows else None
            if plan.guided:
                tokens_in, ages = torch.cat([tokens, tokens]), None if ages is None else torch.cat([ages, ages])
            else:
                tokens_in = tokens
            z = self.backbone(tokens_in, b["text"], ages)
            noise = b["noise"][step.noise_offset : step.noise_offset + step.noise_rows]
            positions = b[f"positions{step.index}"]
            schedule = plan.schedule(b, step.head_steps)
            index = positions.unsqueeze(-1).expand(-1, -1, chans)
            if plan.joint:
                sampled = self.diffloss.net.sample(z, noise.view(batch, seq, chans), schedule, step.cfg)
                base = self._mask_tokens(plan) if step.reset else tokens
                return base.scatter(1, index, sampled.gather(1, index))
            groups = 2 if plan.guided else 1
            rows = positions.unsqueeze(-1).expand(groups, -1, -1, z.shape[-1])
            z_rows = z.unflatten(0, (groups, batch)).gather(2, rows).flatten(0, 2)  # (G B rows, D)
            sampled = self.diffloss.net.sample(z_rows, noise, schedule, step.cfg)
            return tokens.scatter(1, index, sampled.view(batch, step.rows, chans))

        return run

    def _time_embedders(self, plan: SamplingPlan) -> Dict[str, Callable]:
        """The heads' ``schedule_time_embedding`` by buffer prefix, for heads that hoist their
        time embedding out of the sampling loop (the fused samplers of :mod:`nitro_ar.fast`)."""
        heads = {"head": self.diffloss.net}
        if plan.joint:
            heads["global_head"] = self.global_net
        return {name: net.schedule_time_embedding for name, net in heads.items()
                if hasattr(net, "schedule_time_embedding")}

    def _time_embedding_phase(self, plan: SamplingPlan, embedders: Dict[str, Callable]):
        """Every hoisting head's embedding of every schedule of the plan (once per call)."""

        def run(b: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
            return tuple(embed(b[f"timesteps{count}"], self.dtype) for embed in embedders.values()
                         for count in plan.head_counts)

        return run

    def _session(self, plan: SamplingPlan, inputs: Dict[str, torch.Tensor]):
        """The session the phases run in: eager, or replayed from graphs by ``sampling_runner``."""

        def constants() -> Dict[str, torch.Tensor]:
            made = {}
            for count in plan.head_counts:
                schedule = self.head_schedule(count, plan.head_sampler)
                made[f"timesteps{count}"] = schedule.timesteps.to(self.device, copy=True)  # owned, never the cached table
                made[f"sigmas{count}"] = schedule.sigmas.to(self.device, copy=True)
                if plan.head_sampler == "shortcut":
                    made[f"step_size{count}"] = schedule.step_size.to(self.device, copy=True)
            return made

        if self.sampling_runner is None:
            return EagerSession({**inputs, **constants()})
        return self.sampling_runner.session(self, ("NitroAR", plan), inputs, constants)

    @torch.no_grad()
    def generate(
        self,
        text_emb: torch.Tensor,
        uncond_emb: Optional[torch.Tensor] = None,
        *,
        ar_steps: Optional[int] = None,
        head_steps: Union[int, Sequence[int], None] = None,
        cfg: Optional[float] = None,
        cfg_schedule: str = "constant",
        head_steps_schedule: str = "constant",
        head_steps_end: Optional[int] = None,
        refine: bool = False,
        global_token_dependency: bool = False,
        window: Optional[int] = None,
        flush_window: bool = True,
        head_sampler: str = "official",
        generator: Optional[torch.Generator] = None,
        callback: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Generate image latents with masked AR sampling.

        Args:
            text_emb: (B, Lt, C_text) prompt embeddings, B >= 1.
            uncond_emb: (1 or B, Lt, C_text) empty-prompt embeddings; required when cfg != 1.
            ar_steps: AR iterations, an integer >= 1 (default: the config's, 20 for gan, 1 for
                joint_gan).
            head_steps: Euler steps of the head per AR step (default 3 gan / 6 joint_gan), or a
                list with one count per AR step.
            cfg: guidance weight, finite (default 4.0); ``cfg_schedule`` "constant" or "linear".
            head_steps_schedule, head_steps_end: DiSA step annealing ("linear", "cosine",
                "two-stage") from ``head_steps`` down to ``head_steps_end``.
            refine: re-predict every already generated token at each step (not only new ones).
            global_token_dependency: joint_gan: keep the global token in positions not predicted
                at the first step (the official inference replaces them by the mask token).
            window: refinement window k >= 1 (default: ``config.refine_window``, 1 for the
                released models): a token generated at AR step s is re-predicted, from fresh
                noise, at steps s+1 .. s+k-1 and final after that (:mod:`nitro_ar.tensorar`).
                1 is plain masked AR, the same numbers. joint_gan needs ar_steps >= 2.
            flush_window: with k > 1, after the last AR step run k - 1 passes that generate
                nothing new and refine the window to final (TensorAR's Algorithm 1; they reuse
                the last step's head steps and guidance); False: the last step's output is final.
            head_sampler: "official" (the released heads' Euler schedule) or "shortcut" (FAR:
                ``head_steps`` uniform steps of size d = 1/N, d = 0 above 16 steps, given to a
                shortcut head's step embedding; composes with DiSA per-step counts).
            generator: source of all random numbers (see the module docstring for their order).
            callback: called as ``callback(step, tokens)`` after each AR step (and flush pass).
        Returns:
            (B, C, H, W) latents in the model's scaled latent space (divide by
            ``config.scaling_factor`` before the VAE decoder).
        """
        self._check_text(text_emb)
        plan = self.sampling_plan(
            text_emb.shape[0], ar_steps=ar_steps, head_steps=head_steps, cfg=cfg, cfg_schedule=cfg_schedule,
            head_steps_schedule=head_steps_schedule, head_steps_end=head_steps_end, refine=refine,
            global_token_dependency=global_token_dependency, window=window, flush_window=flush_window,
            head_sampler=head_sampler,
        )
        batch, device, dtype = plan.batch, self.device, self.dtype
        text_in = text_emb.to(device=device, dtype=dtype)
        if plan.guided:
            if uncond_emb is None:
                raise invalid("uncond_emb", None, "(1 or B, Lt, C_text) empty-prompt embeddings when cfg != 1")
            self._check_text(uncond_emb)
            if uncond_emb.shape[0] not in (1, batch) or uncond_emb.shape[1] != text_emb.shape[1]:
                raise invalid("uncond_emb", tuple(uncond_emb.shape),
                              f"(1 or {batch}, {text_emb.shape[1]}, C_text) to fit text_emb {tuple(text_emb.shape)}")
            text_in = torch.cat([uncond_emb.to(device=device, dtype=dtype).expand(batch, -1, -1), text_in])
        gen_device = generator.device if generator is not None else device
        session = self._session(plan, {"text": text_in, **self._draw(plan, generator, gen_device)})
        session.phase(lambda b: plan.positions(b["orders"]),
                      [f"positions{step.index}" for step in plan.steps])
        if plan.age_rows:
            session.phase(lambda b: plan.generation_steps(b["orders"]), "made")
        embedders = self._time_embedders(plan)
        if embedders:
            session.phase(self._time_embedding_phase(plan, embedders),
                          [f"{name}_time_embedding{count}" for name in embedders for count in plan.head_counts])
        if plan.joint:
            tokens = session.phase(self._global_phase(plan), "tokens0")
        else:
            tokens = session.phase(lambda b: self._mask_tokens(plan), "tokens0")
        source = "tokens0"
        for step in plan.steps:
            if step.runs:  # ping-pong between two token buffers: a captured step never reads what it writes
                target = "tokens1" if source == "tokens0" else "tokens0"
                tokens = session.phase(self._step_phase(plan, step, source), target, fresh=callback is not None)
                source = target
            if callback is not None:
                callback(step.index, tokens)
        grid = self.config.grid_size
        return session.buffers[source].reshape(batch, grid, grid, plan.chans).permute(0, 3, 1, 2).contiguous()
