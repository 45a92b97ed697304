"""Data files the package ships, found in an installed wheel or a source checkout."""

from __future__ import annotations

from pathlib import Path

CONVERSATION_TRACE = "AzureLLMInferenceTrace_conv.csv"


def trace_path(name: str = CONVERSATION_TRACE) -> Path | None:
    """The Azure LLM inference trace ``name`` (CC-BY 4.0, see its README): in a wheel under
    ``thunderkv/data/traces`` (CMakeLists.txt installs it), in a checkout under
    ``examples/traces``; None when neither has it."""
    pkg = Path(__file__).resolve().parent
    for p in (pkg / "data" / "traces" / name, pkg.parent / "examples" / "traces" / name):
        if p.is_file():
            return p
    return None
