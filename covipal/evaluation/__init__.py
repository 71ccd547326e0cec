"""Evaluation: pruning methods compared at equal budgets, and pruned LVLMs on VQA data sets.

- :mod:`.harness`: every method at every reserve ratio on the same rows and prompts
  (accuracy by first-token or generate scoring, budgets both ways, relevant cells kept);
- :mod:`.vqa`: VQA normalisation and accuracy of generated answers;
- :mod:`.summary`: bootstrap intervals (:mod:`.bootstrap`), the metrics, plot table and
  Markdown report of the ``evaluate`` stage (:mod:`.stage`), with a warning when the
  unpruned model scores zero or at chance;
- :mod:`.cells`: ground-truth relevant cells -> vision tokens (the reference processor);
- :mod:`.registry`: the PPM's numbers on its MLflow registry version;
- :mod:`.hf_vqa`: the harness as a command for a pretrained Hugging Face LVLM on a
  VQA-style data set outside the pipeline (``python -m covipal.evaluation.hf_vqa``).
"""
