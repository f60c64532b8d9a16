"""Train the committed tool-calling LoRA adapter for the default model (SmolLM2-135M-Instruct).

    .venv-vllm/bin/python scripts/train_tool_adapter.py [--out embedded/adapters/smollm2-tool-calling]

Why it exists: the base model never calls a tool under tool_choice="auto" (DESIGN.md §3), so
the local stack gets a real adapter whose effect on the validate matrix can be seen. It
trains a peft LoRA (rank 8, all linear layers) on synthetic Hermes-format conversations from
embedded/tool_data.py — none of them the validation suite's tools or prompts — with the loss
on the assistant's turn only, then measures held-out conversations with and without the
adapter and writes those figures to figures.json beside the adapter. Seeds are fixed, so a
rerun reaches the same figures (tests/test_lora.py, slow-marked, checks that).

Runs in the vLLM environment (torch, transformers, peft); ~20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from embedded import model_kit, tool_data  # noqa: E402

BASE_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_OUT = REPO_ROOT / "embedded" / "adapters" / "smollm2-tool-calling"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
END = "<|im_end|>"
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def encode(tok, example: dict, max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels: the prompt (chat template, generation prompt) is masked out."""
    prompt = tok.apply_chat_template(example["messages"], tools=example["tools"], add_generation_prompt=True, tokenize=False)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    c = tok(example["completion"] + END, add_special_tokens=False)["input_ids"]
    if len(p) + len(c) > max_len:
        return None
    return p + c, [-100] * len(p) + c


def parse_calls(text: str) -> list[dict] | None:
    """The tool calls in a completion as vLLM's hermes parser would see them; None if malformed."""
    calls = []
    for raw in _CALL.findall(text):
        try:
            call = json.loads(raw)
        except json.JSONDecodeError:
            return None
        calls.append({"name": call.get("name"), "arguments": call.get("arguments")})
    if "<tool_call>" in text and not calls:
        return None
    return calls


def correct(example: dict, generated: str) -> bool:
    expected = parse_calls(example["completion"]) or []
    got = parse_calls(generated)
    if got is None:
        return False
    if not expected:
        return got == []
    norm = lambda cs: [(c["name"], json.dumps(c["arguments"], sort_keys=True).lower()) for c in cs]  # noqa: E731
    return norm(got) == norm(expected)


def evaluate(model, tok, held_out: list[dict], torch) -> dict[str, float]:
    """Greedy generation on held-out conversations; per-kind share of exactly right calls (or no call)."""
    hits: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for ex in held_out:
            prompt = tok.apply_chat_template(ex["messages"], tools=ex["tools"], add_generation_prompt=True, tokenize=False)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(input_ids=ids, max_new_tokens=80, do_sample=False,
                                 eos_token_id=tok.convert_tokens_to_ids(END), pad_token_id=tok.convert_tokens_to_ids(END))
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits.setdefault(ex["kind"], []).append(correct(ex, text))
    per_kind = {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}
    per_kind["all"] = round(sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values()), 3)
    return per_kind


def train(out: Path, steps: int, batch: int, lr: float, seed: int, max_len: int, eval_n: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tool_data.check_disjoint(REPO_ROOT / "tasks" / "validation" / "cases" / "default.yaml")
    torch.manual_seed(seed)
    random.seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = model_kit.build()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)

    data = [e for e in (encode(tok, ex, max_len) for ex in tool_data.examples(steps * batch * 2, seed)) if e]
    data = data[: steps * batch]
    held_out = tool_data.examples(eval_n, seed + 1)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 15)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    pad = tok.convert_tokens_to_ids(END)
    losses, started = [], time.monotonic()
    model.train()
    for step in range(steps):
        chunk = data[step * batch:(step + 1) * batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    train_s = time.monotonic() - started

    adapter_eval = evaluate(model, tok, held_out, torch)
    with model.disable_adapter():
        base_eval = evaluate(model, tok, held_out, torch)
    print(f"held-out: adapter {adapter_eval} | base {base_eval}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = BASE_REPO_ID  # the Hub id, not this machine's cache path
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = out / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}, weights)  # half the bytes
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card
    figures = {
        "base_model": BASE_REPO_ID, "rank": config.r, "alpha": config.lora_alpha, "target_modules": TARGET_MODULES,
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "max_len": max_len, "examples": len(data),
        "train_loss_first10": round(sum(losses[:10]) / min(10, len(losses)), 4),
        "train_loss_last10": round(sum(losses[-10:]) / min(10, len(losses)), 4),
        "held_out_examples": eval_n, "held_out_adapter": adapter_eval, "held_out_base": base_eval,
        "train_seconds": round(train_s), "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--max-len", type=int, default=640)
    parser.add_argument("--eval", type=int, default=24, dest="eval_n")
    args = parser.parse_args(argv)
    print(json.dumps(train(args.out, args.steps, args.batch, args.lr, args.seed, args.max_len, args.eval_n), indent=2))


if __name__ == "__main__":
    main()
