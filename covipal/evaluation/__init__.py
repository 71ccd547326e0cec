"""Evaluation: pruning methods compared at equal budgets, and pruned LVLMs on VQA data sets.

- :mod:`.harness`: every method at every reserve ratio on the same rows and prompts
  (accuracy, budgets both ways, relevant cells kept);
- :mod:`.summary`: bootstrap intervals (:mod:`.bootstrap`), the metrics, plot table and
  Markdown report of the ``evaluate`` stage (:mod:`.stage`);
- :mod:`.cells`: ground-truth relevant cells -> vision tokens;
- :mod:`.registry`: the PPM's numbers on its MLflow registry version;
- :mod:`.hf_vqa`: a pretrained Hugging Face LVLM, pruned by any method, on a VQA-style
  data set (``python -m covipal.evaluation.hf_vqa``).
"""
