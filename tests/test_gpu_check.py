"""benchmarks/gpu_check.sh in its dry mode (CPU, tiny model) at its smallest size: install, the smoke test and a shrunk
`lightning-cit fit` of the single-GPU config with a mid-task resume, all figures in one gpu.json. The full dry run
(all steps, ~3-5 min on 2 cores) is `GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_dry_run_records_every_step_and_the_figures(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_STEPS="install,smoke,fit_single", OUT=str(tmp_path), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    steps = report["steps"]
    assert set(steps) == {"install", "smoke", "fit_single", "fit_single_resume"}, steps
    assert all(s["ok"] and not s["timed_out"] for s in steps.values()), {k: s["log_tail"][-500:] for k, s in steps.items() if not s["ok"]}
    smoke = report["smoke"]
    assert smoke["ok"] and smoke["kernels"]["bits_kept"] and smoke["build"]["linear4bit"] == 2 * 7
    train = smoke["train"]
    assert train["checkpointing"] and not train["no_or_zero_grad_0"] and train["eval_pass_grad_rel_diff"] < 1e-2
    assert abs(smoke["losses"]["fused"] - smoke["losses"]["hf"]) < 1e-3 * smoke["losses"]["hf"]
    fit = report["fit_single"]
    info = fit["run"]["info"]
    assert info["inv_freq_dtype"] == ["torch.float32"] and info["fused_loss"] and info["checkpointing_active"]
    assert len(fit["run"]["rows"]) == 6 and [r["step"] for r in fit["resume"]["rows"]] == [3, 4, 5, 6]
    assert fit["resume_max_rel_diff"] < 1e-3  # lora_dropout 0.05 in the config; exact resumes are tested in test_qlora.py
    assert fit["last_ckpt"]["all_lora"]
    assert report["goals"]["tokens_per_s"]["met"] is None  # no GPU figure in a dry run
