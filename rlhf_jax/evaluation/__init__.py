"""Evaluation: gold scores of policies on the toy world (`gold`), reward-model metrics
(`reward_metrics`, `reward_eval`), the method comparison (`compare`) and its plots (`plots`)."""
