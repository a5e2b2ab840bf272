"""The project's model as an lm-evaluation-harness ``LM``: any base plus adapter the scripts accept (``trained_run``),
stored and computed as its run plan says (an NF4 base evaluated on the 4-bit weights it trained on), scored by the
harness's own tasks and metrics. lm-evaluation-harness is an optional extra (``pip install -e ".[eval]"``), imported
here only.

- ``loglikelihood``: the harness's own context/continuation split (``TemplateLM``); requests batched by length,
  longest first, right-padded (a causal model's padding after a sequence changes nothing before it), log-softmax in
  fp32, as the harness's ``hf`` backend scores them.
- ``loglikelihood_rolling``: the harness's own rolling windows of the model's context.
- ``generate_until``: greedy (or sampled, as the task says) with the KV cache, one request at a time, cut at the
  first stop string.
- ``apply_chat_template`` (``--apply_chat_template``): the conversation in the run's prompt format, as training
  rendered it (Alpaca's prompt, or the chat template by its special tokens' ids); the rendered prompt keeps its ids.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .model import Llama
from .prompts import ChatFormat, PromptFormat
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)
EXTRA = 'pip install -e ".[eval]"'

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator
except ImportError:
    raise ValueError(f"Benchmarks run through EleutherAI's lm-evaluation-harness, an optional extra: {EXTRA}, or pip "
                     "install lm-eval") from None


class LlamaLoRALM(TemplateLM):
    """``model`` (built by ``TrainedRun.build``) with its tokenizer and prompt format, for the harness."""

    def __init__(self, model: Llama, tokenizer: Tokenizer, prompt_format: PromptFormat, batch_size: int = 1,
                 max_length: int | None = None) -> None:
        super().__init__()
        self.model, self.tok, self.prompt_format = model.eval(), tokenizer, prompt_format
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len
        self._device = model.tok_embeddings.weight.device
        self._rendered: dict[str, list[int]] = {}  # chat-rendered prompts -> their ids (special tokens by id)

    @property
    def device(self) -> torch.device:
        return self._device

    # ----- tokens -----

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the model has one (the hf backend's rule), else EOS."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the hf backend: BOS by the tokenizer's own rule unless told otherwise. A prompt this LM rendered in a
        chat template keeps its ids; text after it (a continuation) is encoded after them."""
        for rendered, ids in self._rendered.items():
            if string.startswith(rendered):
                return ids + (self.tok.encode(string[len(rendered):]) if len(string) > len(rendered) else [])
        bos = self.tok.add_bos if add_special_tokens is None else add_special_tokens
        return self.tok.encode(string, bos=bool(bos) and self.tok.bos_id is not None)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.path)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.prompt_format, "jinja", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the run's prompt format: a chat format's own ids, or Alpaca's prompt for each user
        turn (the system message as its input) with each answer after it, as training rendered them."""
        fmt, tok = self.prompt_format, self.tok
        if isinstance(fmt, ChatFormat):
            ids = fmt.tokens(chat_history, tok, add_generation_prompt=add_generation_prompt)[0]
        else:
            system = " ".join(m["content"] for m in chat_history if m["role"] == "system")
            ids = []
            for m in chat_history:
                if m["role"] == "user":
                    ids += fmt.prompt({"instruction": m["content"], "input": system}, tok)
                elif m["role"] == "assistant":
                    ids += tok.encode(m["content"], eos=True)
        text = tok.decode(ids)
        self._rendered[text] = ids
        return text

    # ----- scoring -----

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]], scored: list[int]) -> list[torch.Tensor]:
        """Log-probabilities in fp32 of the last ``scored[i]`` positions of each row (right-padded into one batch):
        the output layer and the softmax run only where a continuation is scored, not over the whole context."""
        width = max(len(r) for r in rows)
        batch = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self._device)
        with self.model.plan.autocast_context():
            hidden = self.model(batch, return_hidden=True)
            picked = torch.cat([hidden[i, len(r) - n: len(r)] for i, (r, n) in enumerate(zip(rows, scored))])
            logits = self.model.output(picked)
        return list(F.log_softmax(logits.float(), dim=-1).split(scored))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        def order(request: tuple) -> tuple[int, tuple[int, ...]]:
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=order)
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            # the hf backend's window: the last max_length tokens that predict the continuation
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logprobs = self._logprobs(rows, [len(cont) for _, _, cont in chunk])  # the positions predicting each
            for (key, _, cont), scored in zip(chunk, logprobs):
                target = torch.tensor(cont, device=scored.device)
                greedy = bool((scored.argmax(dim=-1) == target).all())
                answer = (float(scored.gather(-1, target[:, None]).sum()), greedy)
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in (r.args for r in requests):
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
            total = sum(s for s, _ in scores)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return out

    # ----- generation -----

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", 256))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - new):] if new < self.max_length else None
            if not prompt:
                raise ValueError(f"generate_until: max_gen_toks {new} leaves no room for a prompt in a context of "
                                 f"{self.max_length}")
            text, ids = "", []
            for i in self.model.generate_stream(prompt, new, temperature=temperature, top_p=None,
                                                eos_id=self.prompt_format.stop_id(self.tok)):
                ids.append(i)
                text = self.tok.decode(ids)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


# ----- running tasks -----

def _data_error(e: BaseException) -> bool:
    """An error of fetching a task's data (no internet, no such dataset, a missing local file)."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, OSError | ConnectionError) or module in ("datasets", "huggingface_hub", "requests", "urllib3",
                                                                  "fsspec")


def run_tasks(lm: LlamaLoRALM, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | None = None, apply_chat_template: bool = False) -> dict[str, Any]:
    """The harness's ``simple_evaluate`` on ``lm``: its results dict (scores, configs, and each example's requests
    and responses under "samples"). Unknown tasks and data that cannot be fetched get one line each."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, verbosity="ERROR")
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}: `lm_eval ls tasks` lists the harness's own; "
                         "give your own task YAML's folder with --include_path")
    try:
        return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                               apply_chat_template=apply_chat_template, log_samples=True, verbosity="ERROR")
    except Exception as e:  # noqa: BLE001 - whatever fetching a task's dataset raises
        if not _data_error(e):
            raise
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(f"the data of task(s) {', '.join(tasks)} could not be loaded ({first}): the harness downloads "
                         "each task's dataset from the Hugging Face Hub; offline, write a task YAML with dataset_path: "
                         "json and dataset_kwargs: {data_files: ...} naming local files, and give its folder with "
                         "--include_path") from None


def scores(results: dict[str, Any]) -> dict[str, float]:
    """Each task's numeric metrics as "task/metric" (the harness's "acc,none" becomes "acc"), for TensorBoard."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, int | float) and not isinstance(value, bool) and metric != "alias":
                out[f"{task}/{metric}" + (f"_{filt}" if filt not in ("", "none") else "")] = float(value)
    return out


def write_results(results: dict[str, Any], path: str) -> None:
    """The results as the harness's CLI writes them (JSON, with what is not serializable as text)."""
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False))


def table(results: dict[str, Any]) -> str:
    return lm_utils.make_table(results)
