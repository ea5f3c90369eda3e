"""Chat speed: time to first token and decode tokens/s per backend, against the plain-script baseline.

    .venv/bin/python benchmarks/llm.py [--turns 10] [--tokens 32] [--systems baseline,hf,llama-cpp]

Every system holds the same 10-turn conversation with the same model (the offline Qwen2.5 0.5B GGUF; transformers
dequantizes it to float32) in its own process, greedy, with every reply forced to ``--tokens`` tokens so the work is
identical. The baseline is the script from today's guides: each turn it re-renders the whole history with
``apply_chat_template`` and calls ``model.generate`` on it, encoding the whole history again. Ours keep the KV cache
of the previous turn and encode only what is new. "streaming overhead" compares ``stream()`` (incremental
detokenization and stop-string checks per token) with ``complete()`` (decode once at the end) on the same prompt.
Targets: TTFT at turn 10 no worse than 1.5x turn 1; streaming adds under 5% to total generation time.

    .venv/bin/python benchmarks/llm.py --structured [--repeats 3] [--systems llama-cpp,hf]

JSON-schema decoding cost (issue 19): the same request (turn a customer e-mail into a support ticket) answered
freely and under ``TICKET_SCHEMA`` (typed fields, enums, a nested array of objects), greedy, alternated
``--repeats`` times; decode tok/s of the least disturbed run of each. Target: the schema costs at most 15% of
free-text tok/s on the offline default (llama-cpp).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "qwen2.5-0.5b"
SYSTEM_PROMPT = "你是一个乐于助人的助手。回答要简洁、准确。You are a helpful, concise assistant."
QUESTIONS = [
    "北京是哪个国家的首都？请简单介绍一下这座城市的历史。",
    "What are three good ways to learn a new language as an adult?",
    "请解释一下什么是机器学习，以及它和深度学习有什么区别。",
    "Write a short poem about the autumn moon over the river.",
    "如何用Python读取一个CSV文件并计算某一列的平均值？",
    "What is the difference between a process and a thread?",
    "给我推荐三本适合初学者阅读的中国历史书。",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "长城有多长？它是在哪个朝代修建的？",
    "Explain why the sky is blue in simple words for a child.",
    "上海和杭州之间坐高铁需要多长时间？",
    "List four healthy breakfast ideas that take under five minutes.",
]
SYSTEMS = ("baseline", "hf", "llama-cpp")
STRUCTURED_SYSTEMS = ("llama-cpp", "hf")
STRUCTURED_TOKENS = 200
STREAM_REPEATS = 3
TICKET_EMAIL = (
    "Turn this e-mail into a support ticket, as JSON with the fields customer, order_id, category, priority, items "
    "(each with sku, quantity and problem), refund_requested and a summary of at most ten words.\n\n"
    "From: Maria Keller\nSubject: Wrong size, and the second parcel never came\n\n"
    "Hello, I ordered two pairs of running shoes (SKU RS-204, size 39) and a rain jacket (SKU JK-88) in order "
    "558213. The shoes came in size 41 and the jacket has not arrived after three weeks. I would like the shoes "
    "exchanged and my money back for the jacket. This is the second time this happens, please hurry."
)
TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {"type": "string"},
        "order_id": {"type": "integer"},
        "category": {"enum": ["delivery", "wrong_item", "damaged", "billing", "other"]},
        "priority": {"enum": ["low", "normal", "high", "urgent"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer"},
                    "problem": {"type": "string"},
                },
                "required": ["sku", "quantity", "problem"],
                "additionalProperties": False,
            },
        },
        "refund_requested": {"type": "boolean"},
        "summary": {"type": "string"},
    },
    "required": ["customer", "order_id", "category", "priority", "items", "refund_requested", "summary"],
    "additionalProperties": False,
}


def run_system(system: str, turns: int, tokens: int) -> dict[str, Any]:
    """Load, hold the conversation, measure streaming overhead; runs in a child process."""
    started = time.perf_counter()
    measure = _baseline if system == "baseline" else partial(_ours, system)
    result = measure(turns, tokens, started)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _params(tokens: int) -> Any:
    from assistant.config import SamplingConfig

    return SamplingConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=tokens, min_new_tokens=tokens)


def _ours(backend: str, turns: int, tokens: int, started: float) -> dict[str, Any]:
    from assistant import registry
    from assistant.chat import ChatSession
    from assistant.config import LlmConfig
    from assistant.conversation import Conversation
    from assistant.messages import Message

    params = _params(tokens)
    model = registry.create("llm", backend, LlmConfig(backend=backend, model=MODEL, sampling=params))
    load_s = time.perf_counter() - started
    session = ChatSession(model, Conversation(SYSTEM_PROMPT), params)
    first_token, decode_rates, prompt_tokens = [], [], []
    for question in QUESTIONS[:turns]:
        reply = session.send(question)
        for _ in reply:
            pass
        first_token.append(reply.stats.first_token_s)
        decode_rates.append(reply.stats.decode_tokens_per_s)
        prompt_tokens.append(reply.stats.prompt_tokens)
    # streaming overhead: the same prompt, stream() and complete() alternated, best of each
    prompt = [Message("system", SYSTEM_PROMPT), Message("user", QUESTIONS[0])]
    streamed, completed = [], []
    for _ in range(STREAM_REPEATS):
        reply = model.stream(prompt, params)
        for _ in reply:
            pass
        streamed.append(reply.stats.total_s)
        completed.append(model.complete(prompt, params)[1].total_s)
    return {
        "load_s": load_s,
        "first_token_s": first_token,
        "decode_tok_s": statistics.median(decode_rates),
        "prompt_tokens": prompt_tokens,
        "stream_overhead": min(streamed) / min(completed) - 1,
    }


def run_structured(backend: str, repeats: int, tokens: int) -> dict[str, Any]:
    """Free text and schema-constrained JSON for the same request, alternated; runs in a child process."""
    from assistant import registry
    from assistant.config import LlmConfig, SamplingConfig
    from assistant.llm.structured import JsonOutput
    from assistant.messages import Message

    params = SamplingConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=tokens)
    model = registry.create("llm", backend, LlmConfig(backend=backend, model=MODEL, sampling=params))
    prompt = [Message("system", SYSTEM_PROMPT), Message("user", TICKET_EMAIL)]
    output = JsonOutput(TICKET_SCHEMA, name="ticket", strict=True)
    model.stream(prompt, params, output=output).close()  # compiles the grammar (cached) before any run is timed
    runs: dict[str, list[Any]] = {"free": [], "schema": []}
    for _ in range(repeats):
        for mode, constraint in (("free", None), ("schema", output)):
            reply = model.stream(prompt, params, output=constraint)
            text = "".join(reply)
            runs[mode].append((reply.stats.decode_tokens_per_s, reply.stats.completion_tokens, text))
    result: dict[str, Any] = {"model": model.description}
    for mode, measured in runs.items():
        rate, count, text = max(measured)
        result[mode] = {"tok_s": rate, "all_tok_s": [m[0] for m in measured], "tokens": count, "text": text}
    result["schema"]["valid"] = _obeys(result["schema"]["text"], TICKET_SCHEMA)
    return result


def _obeys(text: str, schema: dict[str, Any]) -> bool:
    import jsonschema  # the test extra

    try:
        value = json.loads(text)
    except ValueError:
        return False
    return bool(jsonschema.Draft202012Validator(schema).is_valid(value))


def print_structured_table(results: dict[str, dict[str, Any]], tokens: int) -> None:
    print(f"\nJSON-schema decoding cost: greedy, at most {tokens} tokens, best run of each, this machine's CPU\n")
    header = "| system | free tok/s | schema tok/s | schema / free | cost | tokens free / schema | schema JSON valid |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for system, result in results.items():
        free, schema = result["free"], result["schema"]
        ratio = schema["tok_s"] / free["tok_s"] if free["tok_s"] else 0.0
        print(
            f"| {system} | {free['tok_s']:.1f} | {schema['tok_s']:.1f} | {ratio:.2f} | {(1 - ratio) * 100:+.1f}% | "
            f"{free['tokens']} / {schema['tokens']} | {'yes' if schema['valid'] else 'NO'} |"
        )
    for system, result in results.items():
        print(f"\n{system} ({result['model']}), all runs tok/s: free {_rates(result['free'])}, "
              f"schema {_rates(result['schema'])}\nfree reply: {result['free']['text']}\n"
              f"schema reply: {result['schema']['text']}")  # fmt: skip


def _rates(runs: dict[str, Any]) -> str:
    return ", ".join(f"{rate:.1f}" for rate in runs["all_tok_s"])


def _baseline(turns: int, tokens: int, started: float) -> dict[str, Any]:
    """The plain script: whole history re-rendered and passed to model.generate every turn."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from assistant.models import OFFLINE_BUNDLES, install_bundle

    folder = install_bundle(OFFLINE_BUNDLES[MODEL])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32).eval()
    load_s = time.perf_counter() - started

    class FirstTokenClock(BaseStreamer):
        """generate() calls put() with the prompt first, then with each new token."""

        def __init__(self) -> None:
            self.calls, self.first = 0, 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    history = [{"role": "system", "content": SYSTEM_PROMPT}]
    first_token, decode_rates, prompt_tokens = [], [], []
    for question in QUESTIONS[:turns]:
        history.append({"role": "user", "content": question})
        turn_started = time.perf_counter()
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)  # fmt: skip
        clock = FirstTokenClock()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    streamer=clock)  # fmt: skip
        ended = time.perf_counter()
        new = output[0, inputs["input_ids"].shape[1] :]
        history.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
        first_token.append(clock.first - turn_started)
        decode_rates.append((len(new) - 1) / (ended - clock.first))
        prompt_tokens.append(int(inputs["input_ids"].shape[1]))
    return {
        "load_s": load_s,
        "first_token_s": first_token,
        "decode_tok_s": statistics.median(decode_rates),
        "prompt_tokens": prompt_tokens,
        "stream_overhead": None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=10, help="conversation length (at most 12)")
    parser.add_argument("--tokens", type=int, help="tokens per reply (forced; default 32), or at most (--structured: "
                        f"default {STRUCTURED_TOKENS})")  # fmt: skip
    parser.add_argument("--systems", help=f"default: {','.join(SYSTEMS)} ({','.join(STRUCTURED_SYSTEMS)} with "
                        "--structured)")  # fmt: skip
    parser.add_argument("--structured", action="store_true", help="JSON-schema decoding cost instead")
    parser.add_argument("--repeats", type=int, default=3, help="--structured: runs of each mode")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    turns = max(2, min(args.turns, len(QUESTIONS)))
    tokens = args.tokens if args.tokens is not None else (STRUCTURED_TOKENS if args.structured else 32)
    if args.child:
        result = (run_structured(args.child, args.repeats, tokens) if args.structured
                  else run_system(args.child, turns, tokens))  # fmt: skip
        print(json.dumps(result, ensure_ascii=False))
        return 0
    systems = args.systems or ",".join(STRUCTURED_SYSTEMS if args.structured else SYSTEMS)
    results = {}
    for system in systems.split(","):
        print(f"running {system} ...", file=sys.stderr, flush=True)
        options = ["--turns", str(turns), "--tokens", str(tokens), "--repeats", str(args.repeats)]
        if args.structured:
            options.append("--structured")
        child = subprocess.run([sys.executable, __file__, "--child", system, *options], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{system} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
            continue
        results[system] = json.loads(child.stdout.strip().splitlines()[-1])
    if args.structured:
        print_structured_table(results, tokens)
    else:
        print_table(results, turns, tokens)
    return 0 if results else 1


def print_table(results: dict[str, dict[str, Any]], turns: int, tokens: int) -> None:
    baseline = results.get("baseline")
    print(f"\n{MODEL} GGUF, {turns}-turn conversation, {tokens} tokens per reply, greedy, this machine's CPU\n")
    header = (
        f"| system | load s | prompt tokens turn 1 / {turns} | TTFT turn 1 ms | TTFT turn {turns} ms | "
        f"turn {turns} / turn 1 | decode tok/s | decode vs baseline | TTFT turn {turns} vs baseline | "
        "streaming overhead | peak RSS MB |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for system, result in results.items():
        first, last = result["first_token_s"][0], result["first_token_s"][-1]
        decode_ratio = f"{result['decode_tok_s'] / baseline['decode_tok_s']:.2f}x" if baseline else "-"
        ttft_ratio = f"{baseline['first_token_s'][-1] / last:.1f}x faster" if baseline and system != "baseline" else "-"
        overhead = "-" if result["stream_overhead"] is None else f"{result['stream_overhead'] * 100:+.1f}%"
        print(
            f"| {system} | {result['load_s']:.1f} | {result['prompt_tokens'][0]} / {result['prompt_tokens'][-1]} | "
            f"{first * 1000:.0f} | {last * 1000:.0f} | {last / first:.2f}x | {result['decode_tok_s']:.1f} | "
            f"{decode_ratio} | {ttft_ratio} | {overhead} | {result['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
