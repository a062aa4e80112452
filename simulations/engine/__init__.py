"""The cohort engine: all clients of a round trained together on one device (see ``engine.py``)."""

from fedpersona.simulations.engine.engine import CohortEngine
from fedpersona.simulations.engine.jobs import (EVAL_MODELS, ClientJob, ClientResult, EvalJob, Phase, PhaseResult, joint_phases,
                                     split_phases)
from fedpersona.simulations.engine.stack import PackedExamples

__all__ = ["CohortEngine", "ClientJob", "ClientResult", "EVAL_MODELS", "EvalJob", "Phase", "PhaseResult",
           "PackedExamples", "joint_phases", "split_phases"]
