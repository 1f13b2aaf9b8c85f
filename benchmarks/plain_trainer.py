"""The baselines for ``benchmarks.throughput``: what a user would write with transformers + peft or TRL.

Every strategy trains PEFT LoRA on the same modules kubetune targets, AdamW, cosine schedule, fp32:

* ``random``: ``transformers.Trainer`` with ``DataCollatorForLanguageModeling`` (dynamic padding to
  the longest record of each randomly sampled batch, labels masked on padding): the plain script;
* ``group_by_length``: the same with ``train_sampling_strategy="group_by_length"`` (one flag in
  transformers 5), so batches hold records of similar length and pad little;
* ``trl-packed``: TRL's ``SFTTrainer`` with its best options for this data: best-fit-decreasing
  packing into rows of ``max_seq_length``, padding-free (rows flattened into one sequence with
  position ids restarting per record), no gradient checkpointing and fp32 (TRL's CPU defaults, bf16
  and checkpointing, are about 20x slower here). Completion-only loss is TRL's default for
  prompt/completion data; these records are plain text, so the loss is on every token, as on
  kubetune's side.

Nothing from kubetune is imported, so a baseline cannot inherit its optimisations. Records are tokenized
as kubetune tokenizes ``text`` records (BOS from the tokenizer, EOS appended, cut at ``max_seq_length``)
and handed to every trainer already tokenized, so all sides train on the same tokens.

Throughput counts real tokens of every training batch (the attention mask's ones; every token of a
padding-free batch), over the time between the trainer's ``on_train_begin`` and ``on_train_end``, as
kubetune counts them over its training loop.

Run by ``benchmarks.throughput`` as ``python -m benchmarks.plain_trainer CONFIG.json RESULT.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read_texts(path: Path) -> list[str]:
    return [
        json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def tokenize(tokenizer: Any, texts: list[str], max_seq_length: int) -> list[dict[str, list[int]]]:
    encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
    examples = []
    for ids in encoded:
        ids = list(ids)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        ids = ids[:max_seq_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return examples


STRATEGIES = ("random", "group_by_length", "trl-packed")


def real_tokens(inputs: dict[str, Any]) -> int:
    """Non-padding tokens of one batch: the attention mask's ones, or every token of a padding-free
    batch (which has no mask: its records are flattened into one row without padding)."""
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())


def instrumented_trainer(*, trl: bool, cuda_sync: bool) -> tuple[Any, Any, dict[str, int], dict[str, float]]:
    """A ``Trainer`` (or TRL ``SFTTrainer``) subclass that counts the real tokens of every batch, and a
    callback that times training; both report into the two dicts returned with them."""
    import torch
    from transformers import Trainer, TrainerCallback

    counted = {"real_tokens": 0}
    trainer_class: Any = Trainer
    if trl:
        from trl import SFTTrainer

        trainer_class = SFTTrainer

    class CountingTrainer(trainer_class):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            counted["real_tokens"] += real_tokens(inputs)
            return super().training_step(model, inputs, *args, **kwargs)

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            clock["begin"] = time.monotonic()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda_sync:
                torch.cuda.synchronize()  # queued GPU work belongs to the timed run
            clock["end"] = time.monotonic()

    return CountingTrainer, Clock, counted, clock


def train(config: dict[str, Any]) -> dict[str, Any]:
    """Train as configured; returns real tokens, loop seconds and tokens/s.

    ``config``: model_dir, train_file, output_dir, steps, batch_size, max_seq_length, learning_rate,
    lora_rank, lora_alpha, lora_dropout, seed, and ``strategy`` (one of :data:`STRATEGIES`, default
    ``random``).
    """
    strategy = config.get("strategy", "random")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(config["model_dir"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = tokenize(tokenizer, read_texts(Path(config["train_file"])), config["max_seq_length"])

    base = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32)
    base.config.use_cache = False
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config["lora_rank"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=LLAMA_LORA_TARGETS,
        bias="none",
    )
    model = get_peft_model(base, lora)

    CountingTrainer, Clock, counted, clock = instrumented_trainer(
        trl=strategy == "trl-packed", cuda_sync=False
    )

    common: dict[str, Any] = dict(
        output_dir=config["output_dir"],
        max_steps=config["steps"],
        per_device_train_batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        logging_steps=max(1, config["steps"] // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=config["seed"],
        data_seed=config["seed"],
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    if strategy == "trl-packed":
        from datasets import Dataset
        from trl import SFTConfig

        trainer = CountingTrainer(
            model=model,
            args=SFTConfig(
                **common,
                max_length=config["max_seq_length"],
                packing=True,
                packing_strategy="bfd",
                padding_free=True,
                gradient_checkpointing=False,
                bf16=False,
            ),
            # Already tokenized (input_ids only), so TRL packs exactly the tokens the other sides train on.
            train_dataset=Dataset.from_list([{"input_ids": e["input_ids"]} for e in dataset]),
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
    else:
        if strategy == "group_by_length":
            common["train_sampling_strategy"] = "group_by_length"
        trainer = CountingTrainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Clock()],
        )
    output = trainer.train()
    seconds = clock["end"] - clock["begin"]
    return {
        "real_tokens": counted["real_tokens"],
        "train_seconds": seconds,
        "tokens_per_second": counted["real_tokens"] / seconds if seconds > 0 else None,
        "train_loss": output.training_loss,
        "steps": output.global_step,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.plain_trainer CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    config = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    result = train(config)
    Path(args[1]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
