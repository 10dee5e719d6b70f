"""The `sft` pipeline, declared. Node names and dataset names are part of the interface."""

from kedro.pipeline import Pipeline, node

from sft_pipeline.pipelines.sft import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            node(
                nodes.ingest_records,
                inputs=[
                    "params:data.path",
                    "params:data.schema",
                    "params:data.columns",
                    "params:data.split",
                    "params:data.subset",
                    "params:data.chunk_rows",
                    "params:data.images",
                    "params:data.reasoning_tags",
                    "params:data.sources",
                ],
                outputs="records",
                name="ingest_records",
            ),
            node(
                nodes.validate_records,
                inputs=["records", "params:validation", "params:data.reasoning_tags"],
                outputs=["valid_records", "rejected_records", "validation_report"],
                name="validate_records",
            ),
            node(
                nodes.split_records,
                inputs=[
                    "valid_records",
                    "validation_report",
                    "params:data.eval_fraction",
                    "params:data.seed",
                    "params:validation.max_rejected_fraction",
                    "params:data.sources",
                    "params:data.mixture_rows",
                ],
                outputs=["train_records", "eval_records"],
                name="split_records",
            ),
            node(
                nodes.prepare_base_model,
                inputs="params:model",
                outputs="base_model",
                name="prepare_base_model",
            ),
            node(
                nodes.render_conversations,
                inputs=["train_records", "eval_records", "base_model", "params:template"],
                outputs=["train_texts", "eval_texts"],
                name="render_conversations",
            ),
            node(
                nodes.tokenize_conversations,
                inputs=["train_texts", "eval_texts", "base_model", "params:tokenization"],
                outputs=["train_tokens", "eval_tokens", "token_stats"],
                name="tokenize_conversations",
            ),
            node(
                nodes.train_adapter,
                inputs=[
                    "base_model",
                    "train_tokens",
                    "eval_tokens",
                    "params:quantization",
                    "params:lora",
                    "params:training",
                    "params:tokenization.max_seq_length",
                ],
                outputs=["adapter", "training_history", "training_summary"],
                name="train_adapter",
            ),
            node(
                nodes.merge_adapter,
                inputs=[
                    "base_model",
                    "adapter",
                    "params:data.path",
                    "params:data.schema",
                    "params:data.columns",
                    "params:data.eval_fraction",
                    "params:data.seed",
                    "params:template",
                    "training_summary",
                    "params:merge.base_model",
                ],
                outputs="merged_model",
                name="merge_adapter",
            ),
            node(
                nodes.evaluate_model,
                inputs=[
                    "base_model",
                    "merged_model",
                    "eval_texts",
                    "eval_tokens",
                    "training_history",
                    "token_stats",
                    "params:evaluation",
                    "training_summary",
                    "params:quantization",
                    "params:template",
                ],
                outputs=["metrics", "eval_generations", "evaluation_plots"],
                name="evaluate_model",
            ),
            node(
                nodes.report_run,
                inputs=[
                    "metrics",
                    "training_history",
                    "training_summary",
                    "token_stats",
                    "validation_report",
                    "eval_generations",
                ],
                outputs="run_report",
                name="report_run",
            ),
            node(
                nodes.export_model,
                inputs=["merged_model", "params:export"],
                outputs="exported_model",
                name="export_model",
            ),
        ]
    )
