"""Prediction of validation/test cases with probabilities, confidence scores and confidence-head scores."""
from calibnet.inference.predict import (flagged_cases, folder_case_inputs, load_model, predict_cases,
                                        predict_run_splits, raw_case_inputs, score_run_splits)

__all__ = ["load_model", "predict_cases", "predict_run_splits", "score_run_splits", "folder_case_inputs",
           "raw_case_inputs", "flagged_cases"]
