"""Built-in samplers: flow-matching Euler with the official, DiffSynth and few-step "lightning" schedules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imagezoo.hookspecs import hookimpl


def _flow_match_euler(**options: Any) -> Any:
    from imagezoo.plugins.samplers.flow_match import FlowMatchEuler

    return FlowMatchEuler(**options)


def _diffsynth(**options: Any) -> Any:
    from imagezoo.plugins.samplers.flow_match import START_DIFFSYNTH, FlowMatchEuler

    return FlowMatchEuler(**{"start": START_DIFFSYNTH, **options})


def _lightning(**options: Any) -> Any:
    import math

    from imagezoo.plugins.samplers.flow_match import FlowMatchEuler

    return FlowMatchEuler(**{"shift_terminal": None, "fixed_mu": math.log(3.0), **options})


@hookimpl
def register_samplers(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Official schedule, DiffSynth spacing, and the few-step LoRA preset."""
    register("flow_match_euler", _flow_match_euler)
    register("flow_match_euler_diffsynth", _diffsynth)
    register("flow_match_euler_lightning", _lightning)
