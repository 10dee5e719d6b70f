"""The `sft` pipeline, declared. Node names and dataset names are part of the interface."""

from kedro.pipeline import Pipeline, node

from sft_pipeline.pipelines.sft import nodes

# Each node: its function (whose name is the node's), its inputs, then its outputs, as
# space-separated dataset names in the catalog's and parameters' terms.
NODES = (
    (
        nodes.ingest_records,
        (
            "params:data.path params:data.schema params:data.columns params:data.split "
            "params:data.subset params:data.chunk_rows params:data.images "
            "params:data.reasoning_tags params:data.sources"
        ),
        "records",
    ),
    (
        nodes.validate_records,
        "records params:validation params:data.reasoning_tags",
        "valid_records rejected_records validation_report",
    ),
    (
        nodes.split_records,
        (
            "valid_records validation_report params:data.eval_fraction params:data.seed "
            "params:validation.max_rejected_fraction params:data.sources params:data.mixture_rows"
        ),
        "train_records eval_records",
    ),
    (
        nodes.prepare_base_model,
        "params:model",
        "base_model",
    ),
    (
        nodes.render_conversations,
        "train_records eval_records base_model params:template params:training.roles_to_train",
        "train_texts eval_texts",
    ),
    (
        nodes.tokenize_conversations,
        "train_texts eval_texts base_model params:tokenization",
        "train_tokens eval_tokens token_stats",
    ),
    (
        nodes.train_adapter,
        (
            "base_model train_tokens eval_tokens params:quantization params:lora params:training "
            "params:tokenization.max_seq_length"
        ),
        "adapter training_history training_summary",
    ),
    (
        nodes.merge_adapter,
        (
            "base_model adapter params:data.path params:data.schema params:data.columns "
            "params:data.eval_fraction params:data.seed params:template training_summary "
            "params:merge.base_model"
        ),
        "merged_model",
    ),
    (
        nodes.evaluate_model,
        (
            "base_model merged_model eval_texts eval_tokens training_history token_stats "
            "params:evaluation training_summary params:quantization params:template "
            "params:data.reasoning_tags"
        ),
        "metrics eval_generations evaluation_plots",
    ),
    (
        nodes.report_run,
        (
            "metrics training_history training_summary token_stats validation_report "
            "eval_generations train_texts eval_texts"
        ),
        "run_report",
    ),
    (
        nodes.export_model,
        "merged_model params:export",
        "exported_model",
    ),
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [_node(func, inputs.split(), outputs.split()) for func, inputs, outputs in NODES]
    )


def _node(func, inputs: list[str], outputs: list[str]):
    # A single output is named as a string: the function returns it bare, not in a list.
    return node(func, inputs, outputs if len(outputs) > 1 else outputs[0], name=func.__name__)
