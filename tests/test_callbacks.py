"""The callbacks that prompt the model (samples, held-out accuracy) do it in the run's own prompt format: a chat
run's in its chat template, stopping at its end of turn; an Alpaca run's in Alpaca's prompt."""

import json
from types import SimpleNamespace

import pytest
import torch
from test_chat import llama3_tok  # noqa: F401, F811 - the fixture: a small Llama 3 tiktoken file

from llama_lora.callbacks import InstructionAccuracy, SampleGenerations
from llama_lora.config import LlamaConfig
from llama_lora.data import AlpacaDataModule
from llama_lora.loss import IGNORE_INDEX
from llama_lora.plan import make_plan
from llama_lora.prompts import FORMATS, format_prompt
from llama_lora.tokenizer import Tokenizer
from llama_lora.weights import build_model


def _run(tokenizer_path, data_format, tmp_path, records):
    """A fake trainer and module around a tiny model whose generate and loss calls are recorded."""
    tok = Tokenizer(tokenizer_path)
    config = LlamaConfig.from_name("tiny", vocab_size=tok.vocab_size, max_seq_len=512)
    model = build_model(config, plan=torch.float32, seed=0)
    calls = []
    generate = model.generate

    def recorded(prompt, max_new_tokens, **kwargs):
        calls.append((list(prompt), kwargs["eos_id"]))
        return generate(prompt, max_new_tokens, **kwargs)

    model.generate = recorded
    (tmp_path / "data.json").write_text(json.dumps(records))
    datamodule = AlpacaDataModule(data_path=str(tmp_path / "data.json"), format=data_format,
                                  tokenizer_path=str(tokenizer_path))
    module = SimpleNamespace(model=model, device=torch.device("cpu"), device_mesh=None,
                             plan=make_plan("cpu", "32-true", "fp32", lora=True))
    trainer = SimpleNamespace(sanity_checking=False, datamodule=datamodule, callback_metrics={}, global_step=1,
                              logger=None, is_global_zero=True)
    return tok, trainer, module, calls


def test_a_llama3_chat_runs_samples_and_heldout_answers_are_prompted_in_its_template(llama3_tok,  # noqa: F811
                                                                                      tmp_path):
    """Failed before the prompt formats: both callbacks wrote Alpaca's prompt and stopped at <|end_of_text|>."""
    records = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    tok, trainer, module, calls = _run(llama3_tok.path, "chat", tmp_path, [
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    llama3 = FORMATS["llama3"]
    SampleGenerations(prompts=["Say hi."], max_new_tokens=2).on_validation_end(trainer, module)
    assert calls == [(llama3.prompt({"instruction": "Say hi."}, tok), tok.special["eot"])]

    (tmp_path / "heldout.json").write_text(json.dumps(records))
    calls.clear()
    result = InstructionAccuracy(records=str(tmp_path / "heldout.json"), max_new_tokens=2)._evaluate(trainer, module)
    assert calls == [(llama3.prompt(records[0], tok), tok.special["eot"])]
    # The held-out loss falls on what training's loss falls on: the answer and its <|eot_id|>.
    ids, trained = llama3.render(records[0], tok)
    labels = torch.tensor([[i if t else IGNORE_INDEX for i, t in zip(ids, trained)]])
    from llama_lora.loss import token_loss_sum

    s, n = token_loss_sum(module.model, torch.tensor([ids]), labels)
    assert result["loss"] == pytest.approx(float(s) / int(n), rel=1e-6) and int(n) == len(tok.encode("5")) + 1


def test_an_alpaca_runs_callbacks_prompt_in_alpacas_format(demo_tok, tmp_path):
    records = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    tok, trainer, module, calls = _run(demo_tok.path, "alpaca", tmp_path, records)
    SampleGenerations(prompts=["Say hi."], max_new_tokens=2).on_validation_end(trainer, module)
    (tmp_path / "heldout.json").write_text(json.dumps(records))
    InstructionAccuracy(records=str(tmp_path / "heldout.json"), max_new_tokens=2)._evaluate(trainer, module)
    assert calls == [(tok.encode(format_prompt({"instruction": "Say hi.", "input": ""}), bos=True), tok.eos_id),
                     (tok.encode(format_prompt(records[0]), bos=True), tok.eos_id)]
