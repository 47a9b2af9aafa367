"""Prediction of validation/test cases with probabilities, confidence scores and confidence-head scores.

By job: ``model_loading`` (a run as a model: LoadedModel, load_model), ``cases`` (case listing and
preparation with prompts), ``scores`` (confidence, MC-dropout and head scores), ``confidence_heads`` (the
heads and the features they read), ``predict`` (the export loop and a run's val/test predictions).
"""
from calibnet.inference.cases import folder_case_inputs, raw_case_inputs
from calibnet.inference.model_loading import load_fold_ensemble, load_model
from calibnet.inference.predict import flagged_cases, predict_cases, predict_run_splits, score_run_splits

__all__ = ["load_model", "load_fold_ensemble", "predict_cases", "predict_run_splits", "score_run_splits", "folder_case_inputs",
           "raw_case_inputs", "flagged_cases"]
