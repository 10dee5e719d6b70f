"""Fine-tuning as a workflow: QLoRA, LoRA or full fine-tuning with the project's SFT trainer.

- `job`: `TrainJob`, the frozen description of one run, and its mapping onto `SFTConfig`;
- `workflow`: `train`, the top-down recipe (the library side of the `train_adapter` node);
- `run_state`: run fingerprints and which checkpoint a run resumes from;
- `model_setup`: the model (4-bit or full precision) and the LoRA config;
- `launch`: the same workflow in N processes under `accelerate launch`.
"""
