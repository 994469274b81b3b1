"""Model zoo (design.md section 2): one file per family, all behind :func:`create_model`."""

from fewshifts.models import asnet, fenet, mobilenetv2, resnet, shiftresnet  # noqa: F401  (registers the models)
from fewshifts.models.convert import ConvertReport, convert
from fewshifts.models.io import load_model, save_model
from fewshifts.models.registry import create_model, list_models, register_model

__all__ = ["ConvertReport", "convert", "create_model", "list_models", "load_model", "register_model", "save_model"]
