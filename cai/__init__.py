"""cai: Constitutional AI and RLAIF, from a versioned constitution to a harmless model.

The public API (imported lazily, so `import cai` stays fast):

    load_constitution, SLConfig, run_sl, LabelConfig, JudgeConfig, run_label, judge_pairs,
    SFTConfig, run_sft, PMConfig, run_pm, DPOTrainConfig, run_dpo, RLConfig, run_rl,
    PipelineConfig, run_pipeline, load_backend, GenerationConfig, load_prompts, load_pairs
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_constitution": ("cai.constitution", "load"),
    "SLConfig": ("cai.sl", "SLConfig"),
    "run_sl": ("cai.sl", "run_sl"),
    "LabelConfig": ("cai.label", "LabelConfig"),
    "run_label": ("cai.label", "run_label"),
    "judge_pairs": ("cai.judge", "judge_pairs"),
    "SFTConfig": ("cai.train.sft", "SFTConfig"),
    "run_sft": ("cai.train.sft", "run_sft"),
    "PMConfig": ("cai.train.pm", "PMConfig"),
    "run_pm": ("cai.train.pm", "run_pm"),
    "DPOTrainConfig": ("cai.train.dpo", "DPOTrainConfig"),
    "run_dpo": ("cai.train.dpo", "run_dpo"),
    "RLConfig": ("cai.train.rl", "RLConfig"),
    "run_rl": ("cai.train.rl", "run_rl"),
    "load_reward": ("cai.train.rewards", "load_reward"),
    "JudgeConfig": ("cai.judge", "JudgeConfig"),
    "PipelineConfig": ("cai.pipeline", "PipelineConfig"),
    "run_pipeline": ("cai.pipeline", "run_pipeline"),
    "load_backend": ("cai.backends", "load_backend"),
    "GenerationConfig": ("cai.backends", "GenerationConfig"),
    "load_prompts": ("cai.core.data", "load_prompts"),
    "load_pairs": ("cai.core.data", "load_pairs"),
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'cai' has no attribute {name!r}")
