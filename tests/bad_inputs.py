"""The bad inputs that both scripts refuse before any work, with the message they print: tests/test_bad_inputs.py
checks each, and scripts/troubleshooting.py writes docs/troubleshooting.md from them. Each message names the problem,
then after the first ": " the fix.

A row: (what the user did, the arguments that replace or add to good ones, environment variables, the message).
In the arguments and messages (Python format strings: {{ for a brace), {tmp} is a folder of test files (made by test_bad_inputs.py's fixture), {cwd} the
folder the run starts in, {host} and {pid} those of the process that holds a lock.
"""

# Checks that the two scripts share (run_guards.py, and the code that the CP patch leaves as it is): run with
# run_origin_clm.py in the test's process.
BAD_INPUTS = [
    ("a block shorter than 2 tokens", ["--block_size", "1"], {},
     "--block_size 1 trains nothing (a block's first token is no target, so a block needs 2 tokens or more): pass a "
     "--block_size of 2 or more, or leave it unset."),
    ("a block longer than the model's positions", ["--block_size", "4096"], {},
     "--block_size 4096 is larger than the model's max_position_embeddings (2048): pass a smaller --block_size, or "
     "raise max_position_embeddings with --config_overrides."),
    ("no step to train", ["--max_steps", "0"], {},
     "--max_steps 0 would train nothing (the Trainer trains one step): give a positive --max_steps (MAX_STEPS for the "
     "launchers), or leave it unset to train --num_train_epochs."),
    ("an argument that changes the global batch the launcher set", ["--per-device-train-batch-size", "2"],
     {"GLOBAL_BATCH": "8"},
     "The arguments make a global batch of 2 samples a step (per_device_train_batch_size 2 x "
     "gradient_accumulation_steps 1 x 1 data-parallel replicas), not GLOBAL_BATCH=8: set GLOBAL_BATCH, "
     "PER_DEVICE_BATCH or CP_SIZE for the launchers instead of --per_device_train_batch_size, "
     "--gradient_accumulation_steps or --cp_size."),
    ("an abbreviated argument", ["--per_device_train_b", "4"], {},
     "unrecognized arguments: --per_device_train_b 4: see --help."),
    ("MLP tiles of 0 tokens", ["--tiled_mlp_tokens", "0"], {},
     "--tiled_mlp_tokens must be a positive number of tokens, got 0: give a positive number, or leave it unset."),
    ("the offload without gradient checkpointing", ["--gradient_checkpointing_kwargs", '{{"offload": true}}'], {},
     'gradient_checkpointing_kwargs {{"offload": true}} keeps the checkpointed layer inputs in CPU memory, and there '
     "are none without gradient checkpointing: add --gradient_checkpointing, or drop the offload."),
    ("transformers 5's every_n_layers with the offload",
     ["--gradient_checkpointing", "--gradient_checkpointing_kwargs", '{{"every_n_layers": 2, "offload": true}}'], {},
     'gradient_checkpointing_kwargs "every_n_layers" with {{"offload": true}} would send all the activations of the '
     "layers left without checkpointing to CPU memory (the offload here takes what the whole decoder keeps for the "
     "backward): drop one of the two."),
    ("a tokenizer folder that does not exist", ["--tokenizer_name", "{tmp}/no_such_tokenizer"], {},
     "--tokenizer_name {tmp}/no_such_tokenizer: there is no such folder: give the path of an existing one."),
    ("a tokenizer folder that does not exist, as a relative path", ["--tokenizer_name", "no_such_tokenizer"], {},
     "--tokenizer_name no_such_tokenizer: there is no such folder ({cwd}/no_such_tokenizer), and no model "
     "no_such_tokenizer in the Hub's cache, which is all the Hub there is with HF_HUB_OFFLINE=1 (the launchers' "
     "default): give the path of an existing folder, or set HF_HUB_OFFLINE=0 to download it."),
    ("a train file that does not exist", ["--train_file", "{tmp}/missing.txt"], {},
     "Data file {tmp}/missing.txt is missing or empty: give a text file with content."),
    ("an empty train file", ["--train_file", "{tmp}/empty.txt"], {},
     "Data file {tmp}/empty.txt is missing or empty: give a text file with content."),
    ("a UTF-16 train file", ["--train_file", "{tmp}/utf16.txt"], {},
     "Data file {tmp}/utf16.txt is not UTF-8 text (invalid start byte): convert it to UTF-8 (e.g. with iconv)."),
    ("text shorter than a block", ["--train_file", "{tmp}/tiny.txt", "--validation_file", "{tmp}/tiny.txt"], {},
     "The train text is shorter than one block of 64 tokens: give more text or a smaller --block_size."),
    ("one document and no validation file", ["--text_sample_by", "document"], {},
     "--validation_split_percentage 5 of the 1 examples of {tmp}/small.txt is no example to evaluate on (with "
     "--text_sample_by document a file is one example): give --validation_file."),
    (".json records without a text field", ["--train_file", "{tmp}/titled.json", "--validation_file",
                                            "{tmp}/titled.json"], {},
     "{tmp}/titled.json has no column 'text' to train on, and 2 columns of text (title (string), content (string)): "
     "name the column to train on 'text'."),
    (".json records whose text is numbers", ["--train_file", "{tmp}/numbers.json", "--validation_file",
                                             "{tmp}/numbers.json"], {},
     "Column 'text' of {tmp}/numbers.json holds int64, not text: give text in 'text', or name the column of text "
     "'text'."),
    (".json records of which one has no text", ["--train_file", "{tmp}/holes.json", "--validation_file",
                                                "{tmp}/holes.json"], {},
     "1 of the 40 records of the train data ({tmp}/holes.json) have no 'text': give every record a 'text'."),
    ("document masking with a tokenizer without end-of-text token",
     ["--document_masking", "--tokenizer_name", "{tmp}/tokenizer_without_eos"], {},
     "--document_masking ends every document with the tokenizer's end-of-text token, and the tokenizer "
     "{tmp}/tokenizer_without_eos has none: use a tokenizer with an eos_token, or drop --document_masking."),
    ("the output folder of an earlier run", ["--output_dir", "{tmp}/earlier"], {},
     "Output folder {tmp}/earlier holds an earlier run (checkpoint-30, checkpoint-35), whose checkpoint-35 is "
     "incomplete: resume it with --resume_from_checkpoint {tmp}/earlier/checkpoint-30, give another --output_dir "
     "(OUTPUT_DIR for the launchers), or delete the folder."),
    ("the output folder of a finished run", ["--output_dir", "{tmp}/finished"], {},
     "Output folder {tmp}/finished holds an earlier run (all_results.json, checkpoint-100, trainer_state.json): it is "
     "finished (step 100 of 100): to train it further, resume from {tmp}/finished/checkpoint-100 with a larger "
     "--max_steps (MAX_STEPS for the launchers), or give another --output_dir (OUTPUT_DIR for the launchers), or "
     "delete the folder."),
    ("an output folder in use", ["--output_dir", "{tmp}/busy"], {},
     "Output folder {tmp}/busy is in use by a run in progress (process {pid} on {host}): wait for it to end or give "
     "another --output_dir; if no run is using it, delete {tmp}/busy/run.lock."),
    ("an output folder that is a file", ["--output_dir", "{tmp}/small.txt"], {},
     "--output_dir {tmp}/small.txt is a file: give a folder (OUTPUT_DIR for the launchers)."),
    ("a checkpoint that does not exist", ["--resume_from_checkpoint", "{tmp}/no_such_checkpoint"], {},
     "--resume_from_checkpoint {tmp}/no_such_checkpoint: there is no such folder: give a checkpoint folder "
     "(checkpoint-N in a run's output folder)."),
    ("a damaged checkpoint", ["--resume_from_checkpoint", "{tmp}/damaged"], {},
     "Checkpoint file {tmp}/damaged/rng_state_1.pth is damaged (File is not a zip file): resume from another "
     "checkpoint, or copy it again."),
    ("a checkpoint without its optimizer state", ["--resume_from_checkpoint", "{tmp}/no_optimizer"], {},
     "Checkpoint {tmp}/no_optimizer is incomplete (no optimizer state (optimizer.pt)), so it cannot resume its run "
     "exactly: start a new run from its weights (--model_name_or_path {tmp}/no_optimizer) in another --output_dir."),
    ("a checkpoint without its learning-rate schedule", ["--resume_from_checkpoint", "{tmp}/no_scheduler"], {},
     "Checkpoint {tmp}/no_scheduler is incomplete (no learning-rate schedule (scheduler.pt)), so it cannot resume its "
     "run exactly: start a new run from its weights (--model_name_or_path {tmp}/no_scheduler) in another "
     "--output_dir."),
    ("a checkpoint whose trainer_state.json holds something else", ["--resume_from_checkpoint", "{tmp}/not_a_state"],
     {},
     "Checkpoint {tmp}/not_a_state is incomplete (its trainer_state.json is not the state of a Trainer), so it cannot "
     "resume its run exactly: start a new run from its weights (--model_name_or_path {tmp}/not_a_state) in another "
     "--output_dir."),
]

# What only run_magi_clm.py refuses: run with --cp_size 1 in the test's process, as the one process of a job (the
# launchers' jobs say such a line once: tests/test_launchers.py).
CP_BAD_INPUTS = [
    ("cp_size that does not divide the processes", ["--cp_size", "3"], {},
     "--cp_size 3 does not divide the number of processes (1): launch a multiple of cp_size processes or change "
     "--cp_size."),
    ("cp_size below 1", ["--cp_size", "0"], {},
     "--cp_size must be at least 1, got 0: pass --cp_size 1 (no CP) or more."),
    ("head counts that grouped-query attention cannot split", ["--config_overrides", "num_key_value_heads=3"], {},
     "num_attention_heads (4) is not a multiple of num_key_value_heads (3), so grouped-query attention cannot split "
     "the heads: fix the model config (--config_overrides)."),
    ("streaming with CP", ["--streaming", "--cp_size", "2"], {},
     "--streaming is not supported with --cp_size > 1: drop --streaming (map-style datasets only)."),
    ("a model without the attention registry",  # BLOOM, in transformers 4.51 and 5 (GPT-2 takes it in 5)
     ["--model_type", "bloom", "--config_overrides", "hidden_size=32,n_layer=1,n_head=2"], {},
     "BloomForCausalLM cannot take the registered attention function 'Magi_Attention': it does not call attention "
     "through transformers' ALL_ATTENTION_FUNCTIONS. Use a model that does (Llama, Mistral, Qwen2, ...) or run "
     "run_origin_clm.py."),
]

# FSDP that run_magi_clm.py cannot run as asked, run as one process under torchrun ({tmp}/small.txt is the text),
# and the FSDP resumes that neither script would resume exactly, run with run_origin_clm.py in the test's process
# ({accelerate} is its version): tests/test_fsdp.py runs each.
FSDP_ARGS = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", '{{"fsdp_version": 2}}']
FSDP_BAD_INPUTS = [
    ("FSDP on CPU processes", FSDP_ARGS, {"FSDP_VERSION": "2"},
     "--fsdp: accelerate runs FSDP on GPUs only, and would train these CPU processes with DDP instead, the whole "
     "model state on each: drop --fsdp here (FSDP=1 for the launchers), or run on GPUs."),
    ("FSDP1 with CP", ["--fsdp", "full_shard auto_wrap", "--fsdp_config", '{{"fsdp_version": 1}}'],
     {"FSDP_VERSION": "1"},
     "FSDP1 is not supported with context parallelism (run_magi_clm.py is written and tested for FSDP2; FSDP1 is "
     "deprecated in transformers 5): give --fsdp_config '{{\"fsdp_version\":2}}' (with your other keys), and on "
     "transformers 4.51, which does not hand that to accelerate, set FSDP_VERSION=2 too (the launchers' FSDP=1 does "
     "both)."),
]
FSDP_RESUME_BAD_INPUTS = [
    ("an FSDP run resumed from a checkpoint saved without FSDP",
     [*FSDP_ARGS, "--resume_from_checkpoint", "{tmp}/ddp/checkpoint-5"], {"FSDP_VERSION": "2"},
     "{tmp}/ddp/checkpoint-5 was saved without FSDP, and an FSDP run resumes only from a checkpoint saved under "
     "FSDP: resume it without --fsdp, or start a new FSDP run from its weights with --model_name_or_path "
     "{tmp}/ddp/checkpoint-5 (the optimizer state and the step count start anew)."),
    ("an FSDP2 resume on accelerate 1.6-1.9", [*FSDP_ARGS, "--resume_from_checkpoint", "{tmp}/fsdp/checkpoint-5"],
     {"FSDP_VERSION": "2"},
     "accelerate {accelerate} would resume {tmp}/fsdp/checkpoint-5 without AdamW's moments (it restores FSDP2's "
     "optimizer state into an optimizer that has none yet): FSDP runs resume exactly on the current stack (pip "
     "install -r requirements-current.txt), from checkpoints saved there."),
]

# What the launchers refuse before starting anything (settings are environment variables; the last line of the
# launcher's output): tests/test_launchers.py runs each.
LAUNCHER_BAD_SETTINGS = [
    ("CP_SIZE that does not divide the processes", "run_magi_clm.sh", {"CP_SIZE": "3", "NPROC": "2"},
     "CP_SIZE=3 does not divide the 2 processes: change CP_SIZE or NPROC"),
    ("CP_SIZE 0", "run_magi_clm.sh", {"CP_SIZE": "0"},
     "CP_SIZE=0 is not a positive number of ranks: set CP_SIZE to 1 (no CP), 2, 4 or 8"),
    ("CP_SIZE that is not a number", "run_magi_clm.sh", {"CP_SIZE": "two"},
     "CP_SIZE=two is not a positive number of ranks: set CP_SIZE to 1 (no CP), 2, 4 or 8"),
    ("NNODES that is not a number", "run_magi_clm.sh", {"NNODES": "abc"},
     "NNODES=abc is not a number of nodes: set NNODES to 1 or more"),
    ("NNODES that is not a number", "run_origin_clm.sh", {"NNODES": "abc"},
     "NNODES=abc is not a number of nodes: set NNODES to 1 or more"),
    ("no Python with torch where PYTHON says", "run_magi_clm.sh", {"PYTHON": "/no/such/python"},
     "/no/such/python cannot run torch: set PYTHON to the interpreter of your install (PYTHON=.venv/bin/python)"),
    ("no Python with torch where PYTHON says", "run_origin_clm.sh", {"PYTHON": "/no/such/python"},
     "/no/such/python cannot run torch: set PYTHON to the interpreter of your install (PYTHON=.venv/bin/python)"),
]
