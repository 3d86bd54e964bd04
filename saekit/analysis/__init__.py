"""Analysis of trained SAEs: feature records (``features``, ``records``), the static HTML report
(``report``), plots, and interventions (splice, ablate, clamp, steer) with generation."""

from saekit.analysis.interventions import Edit, InterventionLog, edit_activations, generate, intervene

__all__ = ["Edit", "InterventionLog", "edit_activations", "generate", "intervene"]
