"""The supported version range (pyproject.toml) and the third-party APIs lightning-cit calls, with the arguments it
passes. CI runs the upper end; benchmarks/gpu_check.sh runs this file on the GPU machines, the lower end (torch 2.11
+ CUDA 13, transformers 5.17), so a drift in any of these fails there before a training run does."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from conftest import REPO
from packaging.requirements import Requirement

CORE = ("torch", "lightning", "transformers", "peft", "bitsandbytes")


def parameters(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def test_installed_versions_lie_in_the_supported_range():
    requirements = {Requirement(r).name: Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for name in CORE:
        spec = requirements[name].specifier
        assert spec and any(s.operator == "<" for s in spec), f"{name}: state an upper bound"
        installed = importlib.metadata.version(name).split("+")[0]
        assert spec.contains(installed, prereleases=True), f"{name} {installed} outside {spec}"


def test_torch_apis():
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
    from torch.distributed.fsdp._common_utils import TrainingState  # module.py's inference redirection (private)
    from torch.distributed.fsdp.wrap import _recursive_wrap

    assert {"param_dtype", "reduce_dtype", "buffer_dtype"} <= parameters(MixedPrecision)
    assert MixedPrecision(param_dtype=None, reduce_dtype=None, buffer_dtype=torch.float32).param_dtype is None
    assert {"auto_wrap_policy", "mixed_precision", "sharding_strategy", "device_id", "use_orig_params", "cpu_offload"} <= parameters(
        FullyShardedDataParallel.__init__)
    assert hasattr(FullyShardedDataParallel, "clip_grad_norm_") and TrainingState.IDLE
    # QLoRAWrapPolicy is a callable policy: FSDP calls it with these keywords
    assert "auto_wrap_policy" in parameters(_recursive_wrap)
    assert "module=module, recurse=True, nonwrapped_numel=" in inspect.getsource(_recursive_wrap)
    assert "use_reentrant" in parameters(torch.utils.checkpoint.checkpoint)
    assert "devices" in parameters(torch.random.fork_rng)


def test_lightning_apis():
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from lightning.pytorch.strategies import FSDPStrategy

    assert {"mixed_precision", "auto_wrap_policy", "sharding_strategy", "state_dict_type", "process_group_backend",
            "precision_plugin"} <= parameters(FSDPStrategy.__init__)
    strategy = FSDPStrategy()
    assert strategy.mixed_precision is None  # fsdp_mixed_precision sets this public attribute
    assert isinstance(FSDPStrategy.mixed_precision_config, property)
    assert "mixed_precision=self.mixed_precision_config" in inspect.getsource(FSDPStrategy._setup_model)
    assert hasattr(strategy, "_forward_redirection")  # module.py's inference redirection (no public hook)
    assert callable(FSDPPrecision("bf16-mixed").forward_context)


def test_transformers_apis():
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
    from transformers.generation.utils import GenerationMixin

    assert {"load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
            "bnb_4bit_quant_storage"} <= parameters(BitsAndBytesConfig)
    assert {"config", "local_files_only"} <= parameters(PreTrainedModel.from_pretrained.__func__)
    source = inspect.getsource(PreTrainedModel.from_pretrained)
    for kwarg in ("state_dict", "device_map", "dtype", "quantization_config"):  # passed through **kwargs
        assert f'kwargs.pop("{kwarg}"' in source, kwarg
    assert "gradient_checkpointing_kwargs" in parameters(PreTrainedModel.gradient_checkpointing_enable)
    for name in ("get_decoder", "get_input_embeddings", "get_output_embeddings", "enable_input_require_grads",
                 "disable_input_require_grads", "get_memory_footprint"):
        assert callable(getattr(PreTrainedModel, name)), name
    assert hasattr(AutoModelForCausalLM, "_model_mapping") and callable(AutoConfig.for_model)  # quant.load_causal_lm
    assert "synced_gpus" in parameters(GenerationMixin.generate)
    # how transformers materializes a checkpoint tensor, which quant.RandomTensor imitates
    from transformers import core_model_loading

    assert "tensor[...]" in inspect.getsource(core_model_loading._materialize_copy)


def test_peft_and_bitsandbytes_apis():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from peft import LoraConfig, PeftModel, get_peft_model

    assert {"r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "init_lora_weights"} <= {f.name for f in LoraConfig.__dataclass_fields__.values()}
    assert {"model", "peft_config"} <= parameters(get_peft_model)
    for name in ("get_base_model", "disable_adapter", "set_adapter"):
        assert callable(getattr(PeftModel, name)), name
    assert "quant_storage" in parameters(bnb.nn.Params4bit.__new__) and "quant_storage" in parameters(F.quantize_4bit)
    assert issubclass(bnb.nn.Linear4bit, __import__("torch").nn.Linear)


@pytest.mark.parametrize("name", CORE)
def test_each_core_package_imports(name):
    __import__(name)
