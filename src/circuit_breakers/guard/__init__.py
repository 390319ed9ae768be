"""The guard: harmfulness probes on hidden states that halt a generation, and the server that applies them."""

from .probes import Probe, ProbeMonitor, ProbeSettings, find_probe, fit_probe, train_probe, train_probe_for_model
from .server import DEFAULT_REFUSAL, GuardedGenerator, create_app, load_served_model, run_server

__all__ = [
    "DEFAULT_REFUSAL",
    "GuardedGenerator",
    "Probe",
    "ProbeMonitor",
    "ProbeSettings",
    "create_app",
    "find_probe",
    "fit_probe",
    "load_served_model",
    "run_server",
    "train_probe",
    "train_probe_for_model",
]
