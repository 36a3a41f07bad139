"""Every trainer builds its LoRA adapters through `cai.train.loading.lora_config`, with the
settings each trainer has always used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")

from cai.train.dpo import DPOTrainConfig  # noqa: E402
from cai.train.loading import lora_config  # noqa: E402
from cai.train.pm import PMConfig  # noqa: E402
from cai.train.rl import RLConfig  # noqa: E402
from cai.train.sft import SFTConfig  # noqa: E402

CAI = Path(__file__).resolve().parents[1] / "cai"


def _settings(c) -> dict:
    return {"task_type": str(getattr(c.task_type, "value", c.task_type)), "r": c.r,
            "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
            "target_modules": c.target_modules, "modules_to_save": c.modules_to_save}


def test_sft_lora_settings() -> None:
    c = lora_config(SFTConfig(lora_r=8, lora_alpha=16, lora_dropout=0.1))
    assert _settings(c) == {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                            "target_modules": "all-linear", "modules_to_save": None}


def test_dpo_lora_settings() -> None:
    c = lora_config(DPOTrainConfig(lora_r=4, lora_alpha=8, lora_dropout=0.05))
    assert _settings(c) == {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05,
                            "target_modules": "all-linear", "modules_to_save": None}


def test_pm_lora_settings_train_the_score_head() -> None:
    c = lora_config(PMConfig(lora_r=4, lora_alpha=8, lora_dropout=0.2), task_type="SEQ_CLS",
                    modules_to_save=["score"])
    assert _settings(c) == {"task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "lora_dropout": 0.2,
                            "target_modules": "all-linear", "modules_to_save": ["score"]}


def test_rl_lora_has_no_dropout() -> None:
    c = lora_config(RLConfig(lora_r=2, lora_alpha=4))
    assert _settings(c) == {"task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
                            "target_modules": "all-linear", "modules_to_save": None}


def test_pm_trainer_asks_for_a_sequence_classification_adapter() -> None:
    src = (CAI / "train" / "pm.py").read_text()
    assert 'lora_config(cfg, task_type="SEQ_CLS", modules_to_save=["score"])' in src


def test_lora_config_is_built_in_one_place() -> None:
    sites = [f"{p.relative_to(CAI)}:{i}" for p in sorted(CAI.rglob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bLoraConfig\(", line)]
    assert len(sites) == 1 and sites[0].startswith("train/loading.py:"), sites
