"""The sampler and schedule names users know (AUTOMATIC1111 web UI, ComfyUI) mapped to daguerre's.

A1111 (v1.9 and later) has a "Sampling method" and a separate "Schedule type"; "Automatic" picks the
sampler's own default (`sd_samplers_kdiffusion.samplers_k_diffusion`, option 'scheduler'): Karras
for DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a; Exponential for DPM++ 2M SDE; otherwise
"Uniform", k-diffusion's `get_sigmas` (timesteps evenly spaced from T-1 to 0, sigma interpolated in
log sigma; the same as "Normal"). DPM2 and DPM2 a take one extra step and drop the next-to-last sigma
('discard_next_to_last_sigma'). DDIM, PLMS and UniPC are A1111 "timestep" samplers that ignore the
schedule type: DDIM and PLMS run on the discrete timesteps range(0, T, T // n) + 1 (our "default",
leading spacing with offset 1); A1111's UniPC spaces its steps uniformly in time ('time_uniform'),
the closest of our schedules being "Uniform". LCM follows the Automatic rule (Uniform). DDPM is not
an A1111 sampler (ComfyUI's `ddpm`); daguerre runs it on the leading discrete timesteps, as diffusers'
DDPMScheduler does. Earlier A1111 versions named sampler and schedule together ("DPM++ 2M Karras");
those names still resolve, as does any "<sampler> <schedule>" pair.

`SAMPLER_NAMES` is also the one sampler registry: each row holds the sampler's function (deterministic
ones from samplers.py, stochastic ones from samplers_sde.py), and `SAMPLERS` (daguerre key -> function)
is read from it, so a sampler cannot exist without its names or be missing from the registry.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import samplers as ode
from . import samplers_sde as sde
from .schedules import get_sigmas

Sampler = Callable[..., torch.Tensor]  # sample_<name>(denoiser, x, sigmas, *, extra_args, callback, generator)

AUTOMATIC = "Automatic"


@dataclass(frozen=True)
class ScheduleName:
    """A schedule as A1111 labels it, and how daguerre's `get_sigmas` makes it."""

    label: str  # A1111 "Schedule type"
    kind: str  # get_sigmas kind
    spacing: str = "leading"  # timestep spacing for the "default"/"normal" kinds
    aliases: tuple[str, ...] = ()  # ComfyUI scheduler names and other spellings


SCHEDULES = (
    ScheduleName("Uniform", "normal", "linspace"),
    ScheduleName("Normal", "normal", "linspace", ("normal",)),
    ScheduleName("Karras", "karras", aliases=("karras",)),
    ScheduleName("Exponential", "exponential", aliases=("exponential",)),
    ScheduleName("SGM Uniform", "sgm_uniform", aliases=("sgm_uniform", "SGMUniform")),
    ScheduleName("Simple", "simple", aliases=("simple",)),
    ScheduleName("DDIM", "default", "leading", ("ddim_uniform",)),
)


@dataclass(frozen=True)
class Eta:
    """How a sampler takes A1111's `eta` (the scale of the fresh noise of each step; 0 = deterministic): its
    default and the key A1111 writes to the PNG parameters when a request uses another value. A1111 has two
    settings: `eta_ancestral` (1) for k-diffusion's ancestral and SDE samplers, `eta_ddim` (0) for DDIM;
    a request's `eta` overrides either, and samplers without one ignore it."""

    default: float
    infotext: str


ANCESTRAL_ETA = Eta(1.0, "Eta")  # A1111 setting eta_ancestral
DDIM_ETA = Eta(0.0, "Eta DDIM")  # A1111 setting eta_ddim


@dataclass(frozen=True)
class SamplerName:
    """A sampler as A1111 labels it: daguerre's registry key and function, its Automatic schedule, its other names."""

    label: str  # A1111 "Sampling method"
    sampler: str  # daguerre's name for it: the key in `SAMPLERS`
    function: Sampler  # samplers.sample_* (deterministic) or samplers_sde.sample_* (stochastic)
    automatic: str  # label of the schedule "Automatic" picks
    timestep_sampler: bool = False  # A1111 ignores the schedule type for it; written back as "Automatic"
    discard_penultimate: bool = False  # A1111: one more step, then drop the next-to-last sigma
    aliases: tuple[str, ...] = ()  # ComfyUI names and A1111's internal k_* aliases
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for the sampler
    eta: Eta | None = None  # the sampler takes `eta` (a keyword argument); None: it has none


SAMPLER_NAMES = (
    SamplerName("Euler a", "euler_ancestral", sde.sample_euler_ancestral, "Uniform",
                aliases=("euler_ancestral", "k_euler_a", "k_euler_ancestral"), eta=ANCESTRAL_ETA),
    SamplerName("Euler", "euler", ode.sample_euler, "Uniform", aliases=("euler", "k_euler")),
    SamplerName("LMS", "lms", ode.sample_lms, "Uniform", aliases=("lms", "k_lms")),
    SamplerName("Heun", "heun", ode.sample_heun, "Uniform", aliases=("heun", "k_heun")),
    SamplerName("DPM2", "dpm2", ode.sample_dpm2, "Karras", discard_penultimate=True, aliases=("dpm_2", "k_dpm_2")),
    SamplerName("DPM2 a", "dpm2_ancestral", sde.sample_dpm2_ancestral, "Karras", discard_penultimate=True,
                aliases=("dpm_2_ancestral", "k_dpm_2_a"), eta=ANCESTRAL_ETA),
    SamplerName("DPM++ 2S a", "dpmpp_2s_ancestral", sde.sample_dpmpp_2s_ancestral, "Karras",
                aliases=("dpmpp_2s_ancestral", "k_dpmpp_2s_a"), eta=ANCESTRAL_ETA),
    SamplerName("DPM++ 2M", "dpmpp_2m", ode.sample_dpmpp_2m, "Karras", aliases=("dpmpp_2m", "k_dpmpp_2m")),
    SamplerName("DPM++ SDE", "dpmpp_sde", sde.sample_dpmpp_sde, "Karras",
                aliases=("dpmpp_sde", "dpmpp_sde_gpu", "k_dpmpp_sde"), eta=ANCESTRAL_ETA),
    SamplerName("DPM++ 2M SDE", "dpmpp_2m_sde", sde.sample_dpmpp_2m_sde, "Exponential",
                aliases=("dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "k_dpmpp_2m_sde"), eta=ANCESTRAL_ETA),
    SamplerName("DDIM", "ddim", ode.sample_ddim, "DDIM", timestep_sampler=True, aliases=("ddim",), eta=DDIM_ETA),
    SamplerName("PLMS", "plms", ode.sample_plms, "DDIM", timestep_sampler=True, aliases=("plms",)),
    SamplerName("UniPC", "unipc", ode.sample_unipc, "Uniform", timestep_sampler=True,
                aliases=("uni_pc", "uni_pc_bh2")),
    SamplerName("LCM", "lcm", sde.sample_lcm, "Uniform", aliases=("lcm", "k_lcm")),
    SamplerName("DDPM", "ddpm", sde.sample_ddpm, "DDIM", aliases=("ddpm",)),
)
SAMPLERS: dict[str, Sampler] = {s.sampler: s.function for s in SAMPLER_NAMES}  # the sampler registry, all 15

# A1111's pre-1.9 "<sampler> Karras" aliases (sd_samplers_kdiffusion: k_*_ka).
_KARRAS_ALIASES = {
    "k_lms_ka": "LMS", "k_dpm_2_ka": "DPM2", "k_dpm_2_a_ka": "DPM2 a", "k_dpmpp_2s_a_ka": "DPM++ 2S a",
    "k_dpmpp_2m_ka": "DPM++ 2M", "k_dpmpp_sde_ka": "DPM++ SDE", "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE",
}


@dataclass(frozen=True)
class SamplerChoice:
    """What a (sampler, schedule) pair of names means in daguerre.

    `sampler` is the key in `SAMPLERS`, `schedule` (with `spacing`) the arguments of
    `schedules.get_sigmas`; `a1111_name` / `a1111_schedule` are written to the PNG parameters.
    Use `sigmas(steps, model_sigmas)` for the schedule: it also applies A1111's
    discard-the-penultimate-sigma rule of DPM2 and DPM2 a.
    """

    sampler: str
    schedule: str
    a1111_name: str
    a1111_schedule: str
    spacing: str = "leading"
    discard_penultimate: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    eta: Eta | None = None  # how the sampler takes `eta` (None: it has none, and ignores a request's)

    def sigmas(self, steps: int, model_sigmas: torch.Tensor) -> torch.Tensor:
        """The `steps` + 1 sigmas (ending in 0) of this choice for a model's discrete sigmas."""
        if not self.discard_penultimate:
            return get_sigmas(self.schedule, steps, model_sigmas, spacing=self.spacing)
        sigmas = get_sigmas(self.schedule, steps + 1, model_sigmas, spacing=self.spacing)
        return torch.cat([sigmas[:-2], sigmas[-1:]])


def _key(name: str) -> str:
    """Case-, space- and punctuation-insensitive form: "DPM++ 2M" and "dpmpp_2m" both give "dpmpp2m"."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))


_SAMPLERS_BY_KEY = {_key(n): s for s in SAMPLER_NAMES for n in (s.label, *s.aliases)}
_SCHEDULES_BY_KEY = {_key(n): s for s in SCHEDULES for n in (s.label, *s.aliases)}
_SCHEDULE_BY_LABEL = {s.label: s for s in SCHEDULES}
# longest first, so that "SGM Uniform" is split off before "Uniform"
_SUFFIXES = sorted(_SCHEDULES_BY_KEY, key=len, reverse=True)


def _unknown(what: str, name: str, known: list[str]) -> ValueError:
    """A ValueError naming the unknown name, the closest known ones and all valid names."""
    keys = [_key(k) for k in known]
    close = difflib.get_close_matches(_key(name), keys, n=3, cutoff=0.6)
    hint = " Did you mean " + " or ".join(repr(known[keys.index(k)]) for k in close) + "?" if close else ""
    return ValueError(f"unknown {what} {name!r}.{hint} Valid {what}s: {', '.join(known)}")


def _split(name: str) -> tuple[SamplerName, ScheduleName | None]:
    """The sampler a name denotes and the schedule it carries ("DPM++ 2M Karras"), if any."""
    key = _key(name)
    if key in _SAMPLERS_BY_KEY:
        return _SAMPLERS_BY_KEY[key], None
    legacy = {_key(k): v for k, v in _KARRAS_ALIASES.items()}
    if key in legacy:
        return _SAMPLERS_BY_KEY[_key(legacy[key])], _SCHEDULE_BY_LABEL["Karras"]
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLERS_BY_KEY:
            return _SAMPLERS_BY_KEY[key[: -len(suffix)]], _SCHEDULES_BY_KEY[suffix]
    raise _unknown("sampler", name, _all_sampler_names())


def resolve_sampler(name: str, schedule: str | None = None) -> SamplerChoice:
    """The daguerre sampler and schedule for an A1111 or ComfyUI sampler name and schedule name.

    Matching ignores case, spaces and punctuation ("dpm++ 2m", "DPMPP_2M"). `schedule` None, "" or
    "Automatic" means the sampler's A1111 default (module docstring); a schedule inside the name
    ("DPM++ 2M Karras") is used unless `schedule` names a different one, which is an error.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"no sampler named: give one of {', '.join(list_samplers())}")
    entry, named = _split(name)
    requested = None
    if schedule is not None and _key(schedule) not in ("", _key(AUTOMATIC)):
        requested = _SCHEDULES_BY_KEY.get(_key(schedule))
        if requested is None:
            raise _unknown("schedule type", schedule, list_schedules())
    if named is not None and requested is not None and named != requested:
        raise ValueError(
            f"sampler {name!r} already names the schedule {named.label!r}, but schedule type {schedule!r} was "
            f"given: name the sampler alone ({entry.label!r}) or drop the schedule type"
        )
    chosen = requested or named
    if chosen is None:
        sched = _SCHEDULE_BY_LABEL[entry.automatic]
        a1111_schedule = AUTOMATIC if entry.timestep_sampler else sched.label
    else:
        sched, a1111_schedule = chosen, chosen.label
    return SamplerChoice(
        sampler=entry.sampler,
        schedule=sched.kind,
        a1111_name=entry.label,
        a1111_schedule=a1111_schedule,
        spacing=sched.spacing,
        discard_penultimate=entry.discard_penultimate,
        kwargs=dict(entry.kwargs),
        eta=entry.eta,
    )


def split_sampler_name(name: object) -> tuple[str, str | None] | None:
    """(A1111 sampler label, label of the schedule the name carries or None) of a sampler name:
    "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"), "euler" -> ("Euler", None); None for anything that
    is not a sampler name (`resolve_sampler` reports those, with suggestions)."""
    if not isinstance(name, str):
        return None
    try:
        entry, named = _split(name)
    except ValueError:
        return None
    return entry.label, named.label if named is not None else None


def list_samplers() -> list[str]:
    """The A1111 sampler names, in A1111's order."""
    return [s.label for s in SAMPLER_NAMES]


def list_schedules() -> list[str]:
    """The A1111 schedule types daguerre knows, "Automatic" first."""
    return [AUTOMATIC, *(s.label for s in SCHEDULES)]


def _all_sampler_names() -> list[str]:
    """A1111 names, then the ComfyUI names that are spelled differently."""
    names = list_samplers()
    seen = {_key(n) for n in names}
    for s in SAMPLER_NAMES:
        for a in s.aliases:
            if not a.startswith("k_") and _key(a) not in seen:
                names.append(a)
                seen.add(_key(a))
    return names


def sampler_table() -> str:
    """A plain-text table of the samplers (A1111 name, ComfyUI name, Automatic schedule) for the CLI."""
    rows = [("A1111 name", "ComfyUI name", "Automatic schedule", "daguerre sampler")]
    for s in SAMPLER_NAMES:
        comfy = next((a for a in s.aliases if not a.startswith("k_")), "-")
        rows.append((s.label, comfy, s.automatic, s.sampler))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("Schedule types: " + ", ".join(list_schedules()))
    return "\n".join(lines)
