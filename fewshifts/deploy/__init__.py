"""Inference form and export of shift networks (SSL section 4.3): ``deploy(model)``, ONNX, latency bench."""

from fewshifts.deploy.core import DeployedModel, deploy
from fewshifts.deploy.modules import IntegerShift, Subsample

__all__ = ["deploy", "DeployedModel", "IntegerShift", "Subsample"]
