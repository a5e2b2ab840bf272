"""Log-likelihood throughput of the project's model as an lm-evaluation-harness LM against the harness's own ``hf``
backend (transformers) on the same weights, side by side in one process, in alternating rounds.

    pip install -e ".[eval]"     # lm-evaluation-harness (it brings transformers)
    python benchmarks/harness_speed.py --tokenizer ../shared/assets/tokenizer.model

The model: a random `small`-shape Llama (dim 512, 8 layers, vocab 32000) written once as an HF folder with the
tokenizer; ours reads that folder (no adapter), the hf backend loads it with AutoModelForCausalLM. Both compute in the
same dtype (--dtype: fp32, or bf16 where the CPU computes it natively). The requests: a local multiple-choice task of
--docs Alpaca instructions with 4 candidate answers each (4 requests per document), built once by the harness and
given to both LMs' ``loglikelihood``; the batch size is the same. Prints requests per second (the median of
--rounds) and writes JSON lines to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="LLaMA-2's tokenizer.model")
    parser.add_argument("--data", default=None, help="Alpaca JSON (default: alpaca_5000.json beside the tokenizer)")
    parser.add_argument("--docs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llama_lora.config import LlamaConfig
    from llama_lora.harness import LlamaLoRALM
    from llama_lora.prompts import FORMATS
    from llama_lora.tokenizer import Tokenizer
    from llama_lora.weights import build_model, save_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    work = Path(tempfile.mkdtemp(prefix="harness-speed-"))
    config = LlamaConfig.from_name("small")
    save_hf(build_model(config, plan=dtype, seed=0).state_dict(), config, work / "model")
    tok = Tokenizer(args.tokenizer)
    tok.save_to(work / "model")
    records = json.loads(Path(args.data or Path(args.tokenizer).with_name("alpaca_5000.json")).read_text())
    rng = random.Random(0)
    pool = [r["output"] for r in records if 0 < len(r["output"]) < 200]
    docs = []
    for r in records[: args.docs]:
        choices = [r["output"][:200], *rng.sample(pool, 3)]
        rng.shuffle(choices)
        docs.append({"question": r["instruction"], "choices": choices, "label": choices.index(r["output"][:200])})
    (work / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (work / "mc.yaml").write_text(
        f"task: alpaca_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {work / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n")
    task = TaskManager(include_path=str(work), verbosity="ERROR").load_task_or_group(["alpaca_mc"])["alpaca_mc"]
    task.build_all_requests(rank=0, world_size=1)
    requests = list(task.instances)

    from llama_lora.trained_run import open_run

    run = open_run(checkpoint_dir=work / "model")
    ours = LlamaLoRALM(run.build(dtype), run.tokenizer(), FORMATS["alpaca"], args.batch_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype).eval()
    theirs = HFLM(pretrained=hf_model, tokenizer=transformers.AutoTokenizer.from_pretrained(work / "model"),
                  batch_size=args.batch_size, max_length=config.max_seq_len)
    from llama_lora.plan import native_precision

    kind = "native bf16" if native_precision("cpu")[0] == "bf16-mixed" else "AVX2 only"
    times: dict[str, list[float]] = {"llama-lora": [], "hf": []}
    scores: dict[str, list[float]] = {}
    for i in range(args.rounds):
        order = [("llama-lora", ours), ("hf", theirs)]
        for name, lm in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            with torch.no_grad():
                out = lm.loglikelihood(requests, disable_tqdm=True)
            times[name].append(time.perf_counter() - start)
            scores[name] = [s for s, _ in out]
    # transformers 5's Llama tokenizer splits some runs of spaces otherwise than SentencePiece: the scores are
    # compared where both tokenize the request alike
    alike = [ours.tok_encode("".join(r.args)) == theirs.tok_encode("".join(r.args)) for r in requests]
    gap = max(abs(a - b) for a, b, same in zip(scores["llama-lora"], scores["hf"], alike) if same)
    rows = []
    for name in times:
        rate = len(requests) / statistics.median(times[name])
        rows.append({"tool": name, "requests": len(requests), "batch_size": args.batch_size, "dtype": args.dtype,
                     "requests_per_s": round(rate, 1), "rounds": [round(t, 2) for t in times[name]],
                     "max_abs_loglik_gap": gap, "tokenized_alike": sum(alike), "cpu_kind": kind,
                     "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "transformers": transformers.__version__})
    ratio = rows[0]["requests_per_s"] / rows[1]["requests_per_s"]
    print(f"{len(requests)} log-likelihood requests, shape small, {args.dtype}, batch {args.batch_size}, CPU: {kind}")
    for r in rows:
        print(f"  {r['tool']:>10}: {r['requests_per_s']:8.1f} requests/s  (rounds {r['rounds']} s)")
    print(f"  llama-lora / hf: {ratio:.2f}x; largest log-likelihood gap {gap:.2e} over the {sum(alike)} requests "
          "both tokenize alike")
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
