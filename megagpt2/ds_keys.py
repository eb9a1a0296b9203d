"""Which keys the DeepSpeed JSON may hold: DeepSpeed's own settings, nothing else.

DeepSpeed reads its top-level keys (and those of `activation_checkpointing` and `flops_profiler`)
with defaults, so a misspelt one (`"wall_clock_breakdwn"`, `"zero_optimisation"`) is silently
ignored and the run trains without what was asked for; inside its pydantic sections
(`zero_optimization`, `bf16`, ...) an unknown key fails only at `deepspeed.initialize`, once per
rank, after every process group is up. `unknown_keys` finds both before anything starts, with the
closest valid key as a suggestion.

The tables are what deepspeed 0.19.8 (the pinned version) reads: the top level as recorded from
`DeepSpeedConfig` reading a dict, the sections from its config classes (pydantic fields and
aliases, or the keys read from the dict). tests/test_inputs.py derives both again from the
installed deepspeed and fails when they differ, so a DeepSpeed upgrade updates these tables.
"""

from __future__ import annotations

import difflib
from typing import Any

DEEPSPEED_VERSION = "0.19.8"

TOP_LEVEL = frozenset(
    """
activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger
communication_data_type compile compression_training csv_monitor curriculum_learning data_efficiency
data_types dataloader_drop_last datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue
elasticity expert_parallel flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op
gradient_clipping gradient_predivide_factor graph_harvesting hybrid_engine log_level
managed_gradient_accumulation memory_breakdown nebula optimizer pipeline prescale_gradients
progressive_layer_drop quantize_training scheduler seq_parallel_communication_data_type sparse_attention
sparse_gradients steps_per_print tensor_parallel tensorboard timers torch_autocast train_batch_size
train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown
wandb weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization
sequence_parallel_size
""".split()
)  # sequence_parallel_size: read by DeepSpeedConfig only when no mpu is given (Ulysses)

SECTIONS: dict[str, frozenset[str]] = {
    name: frozenset(keys.split())
    for name, keys in {
        "zero_optimization": """
        allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm contiguous_gradients
        cpu_offload cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint enable_sanity_checks
        gather_16bit_weights_on_model_save ignore_unused_parameters leaf_module legacy_stage1
        load_from_fp32_weights log_trace_cache_warnings max_live_parameters max_reuse_distance
        memory_efficient_linear model_persistence_threshold module_granularity_threshold offload_optimizer
        offload_param overlap_comm override_module_apply param_persistence_threshold parameter_alignment
        pipeline_loading_checkpoint prefetch_bucket_size reduce_bucket_size reduce_scatter
        round_robin_gradients save_muon_momentum_buffer_in_memory stage stage3_allgather_sequential
        stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save
        stage3_max_live_parameters stage3_max_reuse_distance stage3_model_persistence_threshold
        stage3_module_granularity_threshold stage3_param_persistence_threshold stage3_prefetch_bucket_size
        stage3_use_all_reduce_for_fetch_params sub_group_size use_all_reduce_for_fetch_params
        use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size zero_quantized_gradients
        zero_quantized_nontrainable_weights zero_quantized_weights""",
        "bf16": "bf16_master_weights_and_grads bf16_optimizer_states check_grad_overflow enabled immediate_grad_update",
        "fp16": """auto_cast consecutive_hysteresis enabled fp16_master_weights_and_grads hysteresis
               initial_scale_power loss_scale loss_scale_window min_loss_scale""",
        "activation_checkpointing": """contiguous_memory_optimization cpu_checkpointing number_checkpoints
                                   partition_activations profile synchronize_checkpoint_boundary""",
        "flops_profiler": "detailed enabled module_depth output_file profile_step recompute_fwd_factor top_modules",
        "comms_logger": "debug enabled prof_all prof_ops verbose",
        "tensorboard": "enabled job_name output_path",
        "csv_monitor": "enabled job_name output_path",
        "wandb": "enabled group project team",
        "comet": "api_key enabled experiment_key experiment_name mode online project samples_log_interval workspace",
    }.items()
}
READ_WITH_DEFAULTS = frozenset({"activation_checkpointing", "flops_profiler"})  # the others are pydantic models


def unknown_keys(doc: dict[str, Any], source: str) -> list[str]:
    """One message per key of `doc` that DeepSpeed does not have (top level and the SECTIONS)."""
    errors = [_message(source, key, key, TOP_LEVEL, "it would be ignored") for key in doc if key not in TOP_LEVEL]
    for section, known in SECTIONS.items():
        value = doc.get(section)
        if isinstance(value, dict):
            consequence = (
                "it would be ignored"
                if section in READ_WITH_DEFAULTS
                else "deepspeed.initialize would refuse it on every rank"
            )
            errors += [
                _message(source, f"{section}.{key}", key, known, consequence) for key in value if key not in known
            ]
    return errors


def _message(source: str, dotted: str, key: str, known: frozenset[str], consequence: str) -> str:
    close = suggest(key, known)
    if close:
        hint = f"did you mean {dotted[: len(dotted) - len(key)]}{close}?"
    elif len(known) <= 12:
        hint = f"valid keys here: {', '.join(sorted(known))}"
    else:
        hint = "remove it or check the spelling against DeepSpeed's configuration reference"
    return f"{source}: unknown DeepSpeed key {dotted!r} ({consequence}; DeepSpeed {DEEPSPEED_VERSION}): {hint}"


def suggest(word: str, known: frozenset[str]) -> str | None:
    """The one known key that contains the word (micro_batch_size), else the closest by spelling."""
    containing = [k for k in known if word.lower() in k]
    if len(containing) == 1:
        return containing[0]
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None
