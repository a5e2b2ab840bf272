"""Fixtures and helpers shared by the test modules: tiny models, the real assets, and runs of scripts/fit.py."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from llama_lora.config import LlamaConfig
from llama_lora.weights import build_model

ROOT = Path(__file__).resolve().parent.parent
FIT = ROOT / "scripts" / "fit.py"

# `make test` runs the suite in as many pytest-xdist workers as there are cores: each worker, and the processes its
# tests start (fit.py, DDP ranks), then computes on one thread, so that workers do not contend for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _process_state_restored():
    """Each test leaves os.environ and Lightning's rank as it found them, whatever a Trainer made in the test wrote
    (a faked SLURM job's Trainer sets MASTER_ADDR to the node's name, and every later multi-process test in that
    pytest-xdist worker waited for that host; and it sets rank_zero_only.rank to 3, so every later Trainer in the
    worker logged nothing to TensorBoard)."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning_utilities.core import rank_zero as utilities_rank_zero

    saved = dict(os.environ)
    ranks = {f: getattr(f, "rank", 0) for f in (fabric_rank_zero.rank_zero_only, utilities_rank_zero.rank_zero_only)}
    yield
    os.environ.clear()
    os.environ.update(saved)
    for f, rank in ranks.items():
        f.rank = rank


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig.from_name("tiny")


# Tiny models of each family (LlamaConfig.family): tiny's shapes with Mistral v0.1's sliding window (the whole
# context), Qwen2's q/k/v biases and tied output, or Qwen3's q/k norms and a head width that is not dim / n_heads
# (64 / 4 = 16; 24 here, so the queries are 96 wide).
TINY_FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=128, rope_theta=1000000.0),
    "qwen2": dict(attention_bias=True, rope_theta=1000000.0, tie_embeddings=True, norm_eps=1e-6),
    "qwen3": dict(qk_norm=True, head_dim=24, rope_theta=1000000.0, norm_eps=1e-6),
}


def tiny_family(family: str, **overrides) -> LlamaConfig:
    return LlamaConfig.from_name("tiny", **{**TINY_FAMILIES[family], **overrides})


@pytest.fixture
def tiny_model(tiny_config):
    """fp32 random tiny model (GQA on: 4 query heads, 2 key/value heads)."""
    return build_model(tiny_config, plan=torch.float32, seed=0)


@pytest.fixture
def tokens(tiny_config):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_config.vocab_size, (2, 24), generator=g)


@pytest.fixture(scope="session")
def assets() -> Path:
    """The real LLaMA-2 tokenizer and Alpaca sample; set LLAMA_LORA_TEST_ASSETS (.ci/run does)."""
    folder = os.environ.get("LLAMA_LORA_TEST_ASSETS")
    if not folder:
        pytest.skip("LLAMA_LORA_TEST_ASSETS is not set")
    path = Path(folder)
    if not (path / "tokenizer.model").is_file():
        pytest.fail(f"LLAMA_LORA_TEST_ASSETS={folder} has no tokenizer.model")
    return path


@pytest.fixture(scope="session")
def demo_tok(tmp_path_factory):
    """The demo's own SentencePiece tokenizer, trained once per test session."""
    from llama_lora.demo import demo_tokenizer_file
    from llama_lora.tokenizer import Tokenizer

    return Tokenizer(demo_tokenizer_file(1024, tmp_path_factory.mktemp("cache")))


# ----- runs of scripts/fit.py -----

@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama_lora_cache")


def trained_run(tensors: dict[str, torch.Tensor], lora: dict | None):
    """A trained run made in memory: these tensors, under these LoRA settings (None: full fine-tuning)."""
    from llama_lora.lora import LoRASettings
    from llama_lora.prompts import FORMATS
    from llama_lora.trained_run import TrainedRun

    return TrainedRun(None, None, FORMATS["alpaca"], None, source=Path("test"), tensors=tensors,
                      lora=LoRASettings(**lora) if lora is not None else None)


def write_tiny_config(tmp_path: Path, cache_dir: Path, **overrides) -> Path:
    """Write configs/demo.yaml shrunk to the tiny preset (fp32, no dropout, every step logged, checkpoints in
    tmp_path) into tmp_path/config.yaml, with ``overrides`` per section."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    t, m, d = cfg["trainer"], cfg["model"], cfg["data"]
    t.update(precision="32-true", max_steps=6, val_check_interval=3, limit_val_batches=2, log_every_n_steps=1,
             enable_progress_bar=False, enable_model_summary=False)
    t["logger"]["init_args"].update(save_dir=str(tmp_path / "logs"), name="tiny")
    t["callbacks"][0]["init_args"].update(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    t["callbacks"] = [c for c in t["callbacks"] if not c["class_path"].endswith("InstructionAccuracy")]
    m.update(model="tiny", checkpoint_dir=None, base_dtype="fp32",
             lora={"targets": ["wq", "wv", "w2"], "r": 4, "alpha": 8, "dropout": 0.0})
    m["optimizer"]["init_args"]["lr"] = 0.01
    m["scheduler"]["init_args"].update(warmup_steps=2, max_steps=6)
    d.update(demo_records=120, demo_vocab_size=512, val_size=8, max_seq_len=128, micro_batch_size=4,
             group_by_length=False, cache_dir=str(cache_dir))
    for section, values in overrides.items():
        cfg[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(config: Path, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # The tests folder on the path: configs may name callbacks defined in the tests (class_path: test_fit....).
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(FIT), "--config", str(config), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"fit.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_on_meta_base(factory, name: str, seed: int, **model) -> Path:
    """A tiny run (``model`` overrides: LoRA settings, ...) of 2 steps on a bf16 Meta base folder, with the demo
    tokenizer it trained with beside the weights, as Meta ships its tokenizer.model: ``<dir>/base``, ``<dir>/ckpt``."""
    import shutil

    from llama_lora.weights import save_meta

    d, cache = factory.mktemp(name), factory.mktemp("cache")
    config = LlamaConfig.from_name("tiny")
    save_meta(build_model(config, plan=torch.bfloat16, seed=seed).state_dict(), config, d / "base")
    fit(write_tiny_config(d, cache, trainer={"max_steps": 2, "limit_val_batches": 0},
                          model={"checkpoint_dir": str(d / "base"), "base_dtype": "auto", **model}))
    shutil.copyfile(next(cache.glob("demo-tokenizer-512-*.model")), d / "base" / "tokenizer.model")
    return d


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one TensorBoard tag over every run (version) under log_dir; later runs win."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for events in sorted(log_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        found |= set(acc.Tags()["scalars"])
    return found


def lora_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, weights_only=True)["state_dict"]


# ----- several processes -----

FSDP2 = {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
         "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}}
needs_cpu_fsdp2 = pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"),
                                     reason="FSDP2 on CPU processes needs torch.cpu.Stream.record_event")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)


class WholeReads(L.Callback):
    """A callback (for fit.py's config) that counts, from setup on, the checkpoint tensors this process reads whole
    rather than by rows (``full_reads``); subclasses report them with what they measure into ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.full_reads: list[str] = []

    def setup(self, trainer, pl_module, stage) -> None:  # before configure_model
        from llama_lora.weights import LazyStateDict

        read = LazyStateDict.__getitem__

        def counted(sd, key):
            self.full_reads.append(key)
            return read(sd, key)

        LazyStateDict.__getitem__ = counted
